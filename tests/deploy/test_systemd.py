"""systemd/strobe.service: it verifies, its exposure score stays low, and the agent works
inside the sandbox it describes (applied by tests/deploy/unit_sandbox.py, since PID 1 is
not systemd here), including the Type=notify and watchdog contract."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.pprof.builder import parse_pprof
from tests.conftest import REPO, require_tool

UNIT = REPO / "systemd" / "strobe.service"
SANDBOX = REPO / "tests" / "deploy" / "unit_sandbox.py"
INSTALLED_STROBE = "/opt/strobe/.venv/bin/strobe"
MAX_EXPOSURE = 5.0
NOBODY = 65534  # the sandbox's stand-in for the DynamicUser= user


def unit_for_this_checkout(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's agent (verify needs it to exist)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_STROBE} run" in text
    copy = tmp_path / "strobe.service"
    copy.write_text(text.replace(INSTALLED_STROBE, str(REPO / ".venv" / "bin" / "strobe")))
    return copy


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = unit_for_this_checkout(tmp_path)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "strobe.service" not in result.stderr, result.stderr


def test_unit_exposure_is_at_most_5(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = unit_for_this_checkout(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for strobe\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


def sandbox_workdir(tmp_path: Path) -> Path:
    """The work dir the sandbox binds at /tmp/work, writable by the sandbox user (as
    StateDirectory= and CacheDirectory= are by the DynamicUser= user)."""
    work = tmp_path / "work"
    for sub in ("", "store", "cache", "out"):
        (work / sub).mkdir(exist_ok=True)
        os.chown(work / sub, NOBODY, NOBODY)
    work.chmod(0o755)
    return work


def sandboxed(work: Path, command: list[str]) -> list[str]:
    """`command` run inside the unit's sandbox, with `work` at /tmp/work."""
    require_tool("setpriv")
    require_tool("systemd-analyze")
    return [sys.executable, str(SANDBOX), str(UNIT), str(work), "--", *command]


def test_agent_records_inside_the_units_sandbox(
    require_bpf: None, c_binaries: Path, tmp_path: Path
) -> None:
    """MemoryDenyWriteExecute, the system call and address family filters, no root,
    ProtectSystem=strict and PrivateTmp: the agent still profiles and symbolizes."""
    work = sandbox_workdir(tmp_path)
    spin = subprocess.Popen([str(c_binaries / "spin_pie"), "60"])
    try:
        time.sleep(0.2)
        command = sandboxed(work, [str(REPO / ".venv" / "bin" / "strobe"), "record"])
        command += ["--duration", "3", "--pid", str(spin.pid)]
        command += ["--output", "/tmp/work/out/p.pb.gz", "--cache-dir", "/tmp/work/cache"]
        env = {**os.environ, "STROBE_CACHE_DIR": "/tmp/work/cache"}
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, cwd="/", env=env
        )
    finally:
        spin.kill()
        spin.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    profile = parse_pprof((work / "out" / "p.pb.gz").read_bytes())
    functions = {profile.string_table[f.name] for f in profile.function}
    assert {"inner_spin", "outer_function"} <= functions, functions
    assert not any(os.stat(p).st_uid == 0 for p in (work / "out").iterdir()), "ran as root"


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: collects the agent's state datagrams."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o777)  # systemd's is writable by the service's user too
        self.seen: list[str] = []

    def wait_for(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while state not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {state} within {timeout} s; got {self.seen}"
            self.sock.settimeout(remaining)
            try:
                self.seen += self.sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    work = sandbox_workdir(tmp_path)
    notify = NotifySocket(work / "notify")
    yield notify
    notify.close()


def test_daemon_notifies_ready_watchdog_and_stopping_in_the_sandbox(
    require_bpf: None, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    agent = [str(REPO / ".venv" / "bin" / "strobe"), "run", "--http-address", "127.0.0.1:0"]
    agent += ["--local-store", "/tmp/work/store", "--cache-dir", "/tmp/work/cache"]
    agent += ["--window", "2s"]
    command = sandboxed(work, agent)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": "/tmp/work/notify",
        "WATCHDOG_USEC": "60000000",
        "STROBE_CACHE_DIR": "/tmp/work/cache",
    }
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd="/", env=env)
    try:
        notify_socket.wait_for("READY=1", timeout=180)
        notify_socket.wait_for("WATCHDOG=1", timeout=60)
        deadline = time.monotonic() + 120
        while not list((work / "store").glob("*.pb.gz")) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "agent.log").read_text()
        notify_socket.wait_for("STOPPING=1", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    stored = list((work / "store").glob("*.pb.gz"))
    assert stored, (tmp_path / "agent.log").read_text()
    parse_pprof(stored[0].read_bytes())


def test_sandbox_helper_denies_what_the_unit_denies(require_bpf: None, tmp_path: Path) -> None:
    """The emulation is real: under it, W+X memory and netlink sockets are refused and the
    system is read-only (require_bpf: the sandbox needs root to set up)."""
    work = sandbox_workdir(tmp_path)
    probe = (
        "import mmap, socket\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    print('wx-allowed')\n"
        "except PermissionError:\n"
        "    print('wx-denied')\n"
        "try:\n"
        "    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
        "    print('netlink-allowed')\n"
        "except OSError:\n"
        "    print('netlink-denied')\n"
        "open('/tmp/work/out/written', 'w').close()\n"
        "try:\n"
        "    open('/etc/strobe-sandbox-probe', 'w')\n"
        "    print('etc-writable')\n"
        "except OSError:\n"
        "    print('etc-read-only')\n"
    )
    command = sandboxed(work, [sys.executable, "-c", probe])
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["wx-denied", "netlink-denied", "etc-read-only"]
    assert os.stat(work / "out" / "written").st_uid == NOBODY
    assert not Path("/etc/strobe-sandbox-probe").exists()
