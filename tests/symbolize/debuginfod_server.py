"""A stripped program with its separate debug file, and a real elfutils debuginfod serving
it: the parts of the `split` and `debuginfod_url` fixtures (tests/conftest.py), which the
symbolizer's and `strobe record`'s debuginfod tests share."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

WAIT = 60.0


def build_id_of(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID" in line)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    # debuginfod binds every interface and has no bind option: find a port free on all.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Split:
    """A program built with DWARF, its stripped copy and its separate debug file."""

    def __init__(self, full: Path, out: Path, objcopy: str, strip: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.full = full
        self.served = out / "served"
        self.served.mkdir()
        self.debug = self.served / "spin.debug"
        self.stripped = self.served / "spin"
        subprocess.run([objcopy, "--only-keep-debug", str(self.full), str(self.debug)], check=True)
        subprocess.run([strip, "-o", str(self.stripped), str(self.full)], check=True)
        self.build_id = build_id_of(self.full)
        self.local = out / "local" / "spin"  # what the "process" maps
        self.local.parent.mkdir()
        shutil.copy(self.stripped, self.local)


def scanned(server: subprocess.Popen[bytes], url: str) -> bool:
    return server.poll() is not None or http_status(url) == 200


@contextmanager
def serving(debuginfod: str, split: Split, db: Path) -> Iterator[str]:
    """Yields the URL of a debuginfod serving split.served once it has scanned it; stopped
    when the block ends."""
    env = {k: v for k, v in os.environ.items() if k != "DEBUGINFOD_URLS"}  # no federation
    for _ in range(5):
        port = free_port()
        server = subprocess.Popen(
            [debuginfod, "-F", str(split.served), "-p", str(port), "-d", str(db)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        probe = f"{url}/buildid/{split.build_id}/debuginfo"
        try:
            wait_until(functools.partial(scanned, server, probe), "debuginfod to scan")
            if server.poll() is None:
                yield url
                return
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)
    pytest.fail("debuginfod did not start on any of 5 free ports")
