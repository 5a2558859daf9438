"""A real `strobe run`: who may pull a profile over loopback, and what the profile reveals."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.admin.token import GENERATED_NAME
from agent.pprof.builder import parse_pprof
from tests.conftest import REPO, require_tool

NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]  # any local user


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # not listening yet


def as_nobody(url: str, output: Path, *headers: str) -> str:
    """curl run as nobody: the HTTP status; the body lands in `output`."""
    args = [require_tool("setpriv"), *NOBODY, require_tool("curl"), "-s", "-o", str(output)]
    for header in headers:
        args += ["-H", header]
    result = subprocess.run(
        [*args, "-w", "%{http_code}", url], capture_output=True, text=True, timeout=120
    )
    return result.stdout


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """Traversable by nobody (pytest's tmp_path is not), so file modes decide access."""
    with tempfile.TemporaryDirectory(prefix="strobe-pull-") as name:
        os.chmod(name, 0o777)
        yield Path(name)


def test_only_token_holders_pull_and_no_kernel_address_leaks(
    require_bpf: None, shared_dir: Path
) -> None:
    port, cache = free_port(), shared_dir / "cache"
    log = (shared_dir / "agent.log").open("w")
    agent = subprocess.Popen(
        [
            *[sys.executable, "-m", "agent", "run", "--window", "5s"],
            *["--local-store", str(shared_dir / "store"), "--cache-dir", str(cache)],
            *["--http-address", f"127.0.0.1:{port}"],
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    # Syscalls in a loop: kernel frames in every sample of this process.
    busy = subprocess.Popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1"])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while status_of(f"{base}/readyz") != 200:
            assert agent.poll() is None, (shared_dir / "agent.log").read_text()
            assert time.monotonic() < deadline, "agent never became ready"
            time.sleep(0.5)
        token_file = cache / GENERATED_NAME
        info = token_file.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, 0)
        assert str(token_file) in (shared_dir / "agent.log").read_text()  # named at start

        body = shared_dir / "body"
        for path in ("/metrics", "/healthz", "/readyz"):
            assert as_nobody(base + path, body) == "200", path
        url = f"{base}/debug/pprof/profile?seconds=3&pid={busy.pid}"
        assert as_nobody(url, body) == "401"
        assert as_nobody(url, body, "Authorization: Bearer guessed") == "401"
        token = token_file.read_text().strip()  # root can read it and hand it over
        assert as_nobody(url, body, f"Authorization: Bearer {token}") == "200"
        profile = parse_pprof(body.read_bytes())
    finally:
        busy.kill()
        busy.wait()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            log.close()
    assert profile.sample, "the pull returned no samples"
    strings = profile.string_table
    kernel = {m.id for m in profile.mapping if strings[m.filename] == "[kernel.kallsyms]"}
    kernel_locations = [loc for loc in profile.location if loc.mapping_id in kernel]
    assert kernel_locations, "no kernel frames"
    assert [hex(loc.address) for loc in kernel_locations if loc.address] == []
