"""debuginfod: a real elfutils server on loopback supplies a stripped binary's debug
file (and the executable, once the local file is gone); broken servers (404, 500,
garbage, hanging) cost a counted, negatively cached failure and nothing else."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.metrics import DEBUGINFOD_BYTES, DEBUGINFOD_CACHE_HITS, DEBUGINFOD_REQUESTS
from agent.model import Location, ProcessInfo
from agent.symbolize.background_indexer import BackgroundIndexer
from agent.symbolize.debuginfod import DebuginfodClient, Status, urls_from
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import metric_value
from tests.symbolize.debuginfod_server import WAIT, Split, wait_until
from tests.symbolize.helpers import addr2line, file_offset_of, loader_mappings, symbol_vaddr

BASE = 0x7F9A00000000


def requests(result: str) -> float:
    return metric_value(DEBUGINFOD_REQUESTS, result=result)


def loaded(binary: Path) -> ProcessInfo:
    return ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, BASE))


def at_inner_spin(symbolizer: Symbolizer, split: Split, process: ProcessInfo) -> Location:
    # Layout from the unstripped build: the same program headers, and it never goes away.
    vaddr = symbol_vaddr(split.full, "inner_spin") + 8
    inode = split.local.stat().st_ino if split.local.exists() else process.mappings[0].inode
    mappings = tuple(m for m in process.mappings if m.inode == inode)
    offset = file_offset_of(split.full, vaddr)
    mapping = next(m for m in mappings if m.offset <= offset < m.offset + m.end - m.start)
    (location,) = symbolizer.symbolize(process, (mapping.start + offset - mapping.offset,), ())
    return location


def test_stripped_binary_named_from_a_real_debuginfod(
    split: Split, debuginfod_url: str, tmp_path: Path
) -> None:
    client = DebuginfodClient([debuginfod_url], tmp_path / "downloads")
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache", debuginfod=client, debug_dirs=[])
    indexer = BackgroundIndexer(symbolizer, interval=0.2)
    process = loaded(split.local)
    ok_before, bytes_before = requests("ok"), metric_value(DEBUGINFOD_BYTES)
    indexer.start()
    try:
        first = at_inner_spin(symbolizer, split, process)
        assert first.frames == () and first.build_id == split.build_id  # fully stripped
        indexer.wake()  # a window ended: the download starts off the sampling path
        wait_until(lambda: at_inner_spin(symbolizer, split, process).frames != (), "frames")
    finally:
        indexer.stop()
        symbolizer.close()
    location = at_inner_spin(symbolizer, split, process)
    vaddr = symbol_vaddr(split.full, "inner_spin") + 8
    expected = addr2line(split.full, vaddr)
    assert [(f.function, f.file, f.line) for f in location.frames] == expected
    assert location.frames[0].file.endswith("spin.c") and location.frames[0].line > 0
    assert requests("ok") == ok_before + 1
    assert metric_value(DEBUGINFOD_BYTES) >= bytes_before + split.debug.stat().st_size

    # Another agent with the same download cache: a disk hit, no request.
    hits = metric_value(DEBUGINFOD_CACHE_HITS)
    again = DebuginfodClient([debuginfod_url], tmp_path / "downloads")
    status, path = again.request(split.build_id, "debuginfo", lambda _: None)
    assert status is Status.READY and path is not None and path.read_bytes()[:4] == b"\x7fELF"
    assert metric_value(DEBUGINFOD_CACHE_HITS) == hits + 1 and requests("ok") == ok_before + 1
    again.close()


def test_executable_downloaded_when_the_local_file_is_gone(
    split: Split, debuginfod_url: str, c_binaries: Path, tmp_path: Path
) -> None:
    client = DebuginfodClient([debuginfod_url], tmp_path / "downloads")
    symbolizer = Symbolizer(
        cache_dir=tmp_path / "cache", debuginfod=client, debug_dirs=[], max_binaries=1
    )
    process = loaded(split.local)
    assert at_inner_spin(symbolizer, split, process).build_id == split.build_id  # seen once
    split.local.unlink()  # e.g. upgraded away while the process runs
    other = loaded(c_binaries / "spin_nopie")
    symbolizer.symbolize(other, (other.mappings[0].start,), ())  # evicts the first binary
    try:

        def named() -> bool:
            symbolizer.prepare_pending()
            return at_inner_spin(symbolizer, split, process).frames != ()

        wait_until(named, "frames from the downloaded executable and debug file")
    finally:
        symbolizer.close()
    assert (tmp_path / "downloads" / split.build_id / "executable").is_file()
    assert at_inner_spin(symbolizer, split, process).frames[0].function == "inner_spin"


# --- broken servers --------------------------------------------------------------


class BadServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str, payload: bytes) -> None:
        super().__init__(("127.0.0.1", 0), BadHandler)
        self.mode, self.payload = mode, payload
        self.hits = 0
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class BadHandler(http.server.BaseHTTPRequestHandler):
    server: BadServer

    def do_GET(self) -> None:
        self.server.hits += 1
        mode = self.server.mode
        if mode == "hang":  # answers (with the real file!) only long after any sane timeout
            self.server.release.wait(WAIT)
            body = self.server.payload
        elif mode == "garbage":
            body = os.urandom(4096)
        else:
            self.send_error(404 if mode == "404" else 500)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bad_server(request: pytest.FixtureRequest, split: Split) -> Iterator[BadServer]:
    server = BadServer(request.param, split.debug.read_bytes())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.mark.parametrize(
    ("bad_server", "result"),
    [("404", "not_found"), ("500", "error"), ("garbage", "invalid"), ("hang", "timeout")],
    indirect=["bad_server"],
)
def test_broken_server(bad_server: BadServer, result: str, split: Split, tmp_path: Path) -> None:
    client = DebuginfodClient([bad_server.url], tmp_path / "downloads", timeout=0.5)
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache", debuginfod=client, debug_dirs=[])
    process = loaded(split.local)
    before = requests(result)
    try:
        first = at_inner_spin(symbolizer, split, process)
        assert symbolizer.prepare(process) == 0  # the download started; nothing blocks
        wait_until(lambda: requests(result) == before + 1, f"a {result} request")
        settled = lambda: symbolizer.prepare_pending() == 0 and not client_busy(client)  # noqa: E731
        wait_until(settled, "the failed download to settle")
        location = at_inner_spin(symbolizer, split, process)
        assert location.address == first.address and location.frames == ()
        assert location.build_id == split.build_id
        # Negative cache: asking again within the TTL goes to no server.
        hits = bad_server.hits
        status, _ = client.request(split.build_id, "debuginfo", lambda _: None)
        assert status is Status.UNAVAILABLE and bad_server.hits == hits
        assert not list((tmp_path / "downloads").rglob("debuginfo"))  # nothing bad kept
    finally:
        symbolizer.close()


def client_busy(client: DebuginfodClient) -> bool:
    return bool(client._in_flight)


def test_blocking_fetch_tries_servers_in_order(
    split: Split, debuginfod_url: str, tmp_path: Path
) -> None:
    with BadServer("404", b"") as missing:
        thread = threading.Thread(target=missing.serve_forever, daemon=True)
        thread.start()
        try:
            client = DebuginfodClient([missing.url, debuginfod_url], tmp_path / "d")
            path = client.fetch(split.build_id, "debuginfo")
            assert path is not None and path.read_bytes() == split.debug.read_bytes()
            assert missing.hits == 1
            assert client.fetch("zz-not-hex", "debuginfo") is None
            assert client.fetch(split.build_id, "source") is None
            client.close()
        finally:
            missing.shutdown()
            thread.join(timeout=30)


def test_urls_come_from_the_option_or_debuginfod_urls() -> None:
    env = {"DEBUGINFOD_URLS": "https://a.example/ http://b.example:8002 file:///srv/x"}
    assert urls_from([], env) == ("https://a.example", "http://b.example:8002")
    assert urls_from(["http://c.example/"], env) == ("http://c.example",)
    assert urls_from([], {}) == ()


def test_without_servers_nothing_is_requested(tmp_path: Path) -> None:
    client = DebuginfodClient([], tmp_path)
    assert client.request("ab" * 20, "debuginfo", lambda _: None) == (Status.UNAVAILABLE, None)
    client.close()
