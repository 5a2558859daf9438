"""A minimal DevTools-protocol client for headless Chromium, on the standard library only.

Chromium is started with --remote-debugging-port=0 and writes the port it chose into
<user-data-dir>/DevToolsActivePort. The protocol runs over a WebSocket: here a bare RFC 6455
client (text frames, client-side masking, no extensions), enough to send commands, read
their results and collect events such as a JavaScript prompt() opening.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from tests.browser.png import png_rows

# The flags that work in this sandbox (no setuid sandbox, no GPU), and nothing that phones
# home: a test that must show "no network" cannot have the browser itself fetching things.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--force-color-profile=srgb",  # fills come out as the SVG says, pixel for pixel
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
)
TIMEOUT = 30.0  # s: a loaded CI machine starting Chromium and rendering a few thousand boxes


class CdpError(RuntimeError):
    pass


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Kill a browser started with start_new_session=True and its helper processes
    (renderer, zygote: the group it leads), which write to its profile until they exit.
    SIGKILL: its profile is thrown away, and SIGTERM takes the helpers ~1.5 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=TIMEOUT)


def remove_profile(profile: tempfile.TemporaryDirectory[str]) -> None:
    """Remove a killed browser's profile; a helper dying a moment late may have added a
    file after the walk listed its directory."""
    for _ in range(20):
        try:
            profile.cleanup()
            return
        except OSError:
            time.sleep(0.1)
    profile.cleanup()


def screenshot(chromium: str, url: str, out: Path, width: int, height: int) -> None:
    """`chromium --screenshot`: what a user opening `url` in a window of that size sees.
    Only for a page that does not scroll itself: Chromium 156's --screenshot of a scrolled
    page is blank (HTML too), so a tall flame graph is captured over DevTools instead."""
    profile = tempfile.TemporaryDirectory()
    process = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile.name}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT * 2)
    finally:
        stop_group(process)  # helpers may outlive the browser that wrote the PNG
        remove_profile(profile)
    if process.returncode != 0:
        raise CdpError(f"chromium --screenshot: {stderr.decode(errors='replace')[-2000:]}")


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol (one peer, text messages)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise CdpError("DevTools closed the connection during the handshake")
            response += chunk
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise CdpError(f"WebSocket handshake refused: {head.decode(errors='replace')}")

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise CdpError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def receive(self) -> str:
        """The next text message (continuation frames joined)."""
        message = b""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read(8))
            payload = self._read(size)  # the server never masks
            opcode = first & 0x0F
            if opcode == 0x8:
                raise CdpError("DevTools closed the WebSocket")
            if opcode in (0x0, 0x1):
                message += payload
                if first & 0x80:  # FIN
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, width: int, height: int) -> None:
        self.profile = tempfile.TemporaryDirectory()
        self.process = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile.name}",
                "--remote-debugging-port=0",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: its helpers end with it
        )
        self.next_id = 0
        self.events: deque[dict[str, Any]] = deque()
        self.replies: dict[int, dict[str, Any]] = {}  # results that came while awaiting others
        try:
            self.ws = WebSocket(self._page_url(self._port()))
        except BaseException:
            stop_group(self.process)
            remove_profile(self.profile)
            raise

    def _port(self) -> int:
        active = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CdpError(f"chromium exited with {self.process.returncode}")
            if active.exists() and active.read_text().strip():
                return int(active.read_text().split()[0])
            time.sleep(0.05)
        raise CdpError("chromium did not open its DevTools port")

    def _page_url(self, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as r:
            targets = json.load(r)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise CdpError(f"no page target in {targets}")
        return str(pages[0]["webSocketDebuggerUrl"])

    def send(self, method: str, **params: Any) -> int:
        """Send a command without waiting (its result comes with `result(id)`)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return self.next_id

    def result(self, command_id: int) -> dict[str, Any]:
        message = self.replies.pop(command_id, None)
        while message is None:
            received = json.loads(self.ws.receive())
            if "method" in received:
                self.events.append(received)
            elif received.get("id") == command_id:
                message = received
            else:
                self.replies[received["id"]] = received
        if "error" in message:
            raise CdpError(f"{message['error']}")
        return dict(message.get("result", {}))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.result(self.send(method, **params))

    def event(self, method: str) -> dict[str, Any]:
        """The params of the first `method` event, received already or next."""
        for seen in list(self.events):
            if seen["method"] == method:
                self.events.remove(seen)
                return dict(seen.get("params", {}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("method") == method:
                return dict(message.get("params", {}))
            if "method" in message:
                self.events.append(message)
            else:
                self.replies[message["id"]] = message

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a page expression (an exception in the page fails the call)."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise CdpError(f"{expression!r} raised {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.event("Page.loadEventFired")

    def _mouse(self, kind: str, x: float, y: float) -> int:
        return self.send(
            "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
        )

    def click(self, x: float, y: float) -> None:
        """A real left click at viewport (x, y): move, press and release, as a mouse does."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.result(self._mouse(kind, x, y))

    def click_and_answer(self, x: float, y: float, answer: str) -> str:
        """Click where the page calls prompt(), type `answer` and press OK; the prompt's
        message. (The release's result waits for the dialog: the page is blocked in it.)"""
        self.result(self._mouse("mouseMoved", x, y))
        self.result(self._mouse("mousePressed", x, y))
        released = self._mouse("mouseReleased", x, y)
        dialog = self.event("Page.javascriptDialogOpening")
        self.call("Page.handleJavaScriptDialog", accept=True, promptText=answer)
        self.result(released)
        return str(dialog["message"])

    def press(self, key: str, code: int) -> None:
        """A key press (`key` as KeyboardEvent.key names it, `code` its virtual key code)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code
            )

    def pixel(self, x: float, y: float) -> tuple[int, int, int]:
        """The rendered color at viewport (x, y), from a 1x1 screenshot."""
        left, top = self.evaluate("[scrollX, scrollY]")  # the clip is in page coordinates
        clip = {"x": int(x) + left, "y": int(y) + top, "width": 1, "height": 1, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        return png_rows(base64.b64decode(data))[0][0]

    def close(self) -> None:
        self.ws.close()
        stop_group(self.process)
        remove_profile(self.profile)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()
