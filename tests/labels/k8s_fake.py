"""A Kubernetes API server double over real HTTP(S), serving recorded responses.

It speaks the API server's wire format for what the pod watcher uses: LIST returns a
recorded PodList; each WATCH takes the next scripted step (recorded JSON lines sent as
HTTP/1.1 chunks, then a clean end, a connection cut mid-line, an open stream that ends
at timeoutSeconds, or an error status). It checks the bearer token and records every
request so tests can assert what the client asked for.
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

K8S_DATA = Path(__file__).resolve().parent.parent / "data" / "k8s"
TLS = K8S_DATA / "tls"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.strobe-test-token"


@dataclass
class WatchStep:
    """One WATCH response. `then`: "end" | "break" (cut mid-line) | "hold" | "status"."""

    lines: list[bytes] = field(default_factory=list)
    then: str = "end"
    status: int = 200
    partial: bytes = b""  # sent before a "break": the start of a line that never ends


@dataclass
class Request:
    path: str
    query: dict[str, str]
    authorization: str


class FakeApiServer:
    def __init__(self, tls: ssl.SSLContext | None = None, token: str = TOKEN) -> None:
        self.token = token
        self.pod_list = (K8S_DATA / "podlist.json").read_bytes()
        self.watch_steps: queue.Queue[WatchStep] = queue.Queue()
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def lists(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if "watch" not in r.query]

    def watches(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.query.get("watch") == "1"]

    def next_step(self) -> WatchStep | None:
        while not self.stopping.is_set():
            try:
                return self.watch_steps.get(timeout=0.1)
            except queue.Empty:
                continue
        return None


def _handler_for(server: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked transfer encoding, like the API server

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            server.record(Request(parts.path, query, self.headers.get("Authorization", "")))
            if self.headers.get("Authorization") != f"Bearer {server.token}":
                self._status(401, "Unauthorized", "Unauthorized")
            elif parts.path != "/api/v1/pods":
                self._status(404, "NotFound", f"the server could not find {parts.path}")
            elif query.get("watch") == "1":
                self._watch(query)
            else:
                self._send(200, server.pod_list)

        def _watch(self, query: dict[str, str]) -> None:
            step = server.next_step()
            if step is None:
                return self._status(503, "ServiceUnavailable", "shutting down")
            if step.then == "status":
                return self._status(step.status, "Expired", "too old resource version")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for line in step.lines:
                self._chunk(line)
            if step.then == "break":
                self._chunk(step.partial)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no final chunk: a cut stream
                return None
            if step.then == "hold":  # like the API server: open until timeoutSeconds
                server.stopping.wait(float(query.get("timeoutSeconds", "30")))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return None

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _status(self, code: int, reason: str, message: str) -> None:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            }
            self._send(code, json.dumps(status).encode())

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def watch_lines(name: str) -> list[bytes]:
    """A recorded watch stream: one JSON event per line, newline included."""
    return (K8S_DATA / name).read_bytes().splitlines(keepends=True)


def server_tls(require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "server.crt", TLS / "server.key")
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(TLS / "ca.crt")
    return context
