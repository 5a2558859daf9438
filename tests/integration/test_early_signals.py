"""Signals from the first instant of `strobe run`: a SIGHUP during start-up (imports,
config, the BPF load) is a reload once the agent is up, not its death; an early SIGTERM
stops it cleanly."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.integration.strobe_run import start_strobe_run, stop_strobe_run
from tests.integration.test_pull_auth import free_port


def test_sighup_at_half_a_second_is_a_reload(require_bpf: None, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    agent = start_strobe_run(tmp_path, log, free_port())
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
        stop_strobe_run(agent, log)


def test_early_sigterm_stops_cleanly(require_bpf: None, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    agent = start_strobe_run(tmp_path, log, free_port())
    time.sleep(0.5)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "stopped cleanly" in log.read_text()
