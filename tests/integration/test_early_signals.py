"""Signals from the first instant of `strobe run`: a SIGHUP during start-up (imports,
config, the BPF load) is a reload once the agent is up, not its death; an early SIGTERM
stops it cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.integration.test_pull_auth import free_port


def start_agent(tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--window", "2s"]
            + ["--local-store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
            + ["--http-address", f"127.0.0.1:{free_port()}"],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop(agent: subprocess.Popen[bytes], log: Path) -> None:
    agent.send_signal(signal.SIGTERM)
    try:
        assert agent.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_sighup_at_half_a_second_is_a_reload(require_bpf: None, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    agent = start_agent(tmp_path, log)
    try:
        time.sleep(0.5)
        agent.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "reload:" not in log.read_text():
            assert agent.poll() is None, f"killed by an early SIGHUP: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert agent.poll() is None
    finally:
        stop(agent, log)


def test_early_sigterm_stops_cleanly(require_bpf: None, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    agent = start_agent(tmp_path, log)
    time.sleep(0.5)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "stopped cleanly" in log.read_text()
