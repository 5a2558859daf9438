"""A rotated admin token takes effect on SIGHUP: the old one is refused, the new one works."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.strobe_run import start_strobe_run, stop_strobe_run
from tests.integration.test_pull_auth import free_port


def status(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_token_file_is_reread_on_sighup(require_bpf: None, tmp_path: Path) -> None:
    token_file, log = tmp_path / "token", tmp_path / "agent.log"
    token_file.write_text("first-secret\n")
    token_file.chmod(0o600)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"  # with a configured token, /metrics needs it
    agent = start_strobe_run(tmp_path, log, port, "--http-token-file", str(token_file))
    try:
        deadline = time.monotonic() + 120
        while "window 1:" not in log.read_text():  # up, with its SIGHUP handler
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert status(url, "first-secret") == 200
        assert status(url, "second-secret") == 401
        token_file.write_text("second-secret\n")
        agent.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while status(url, "second-secret") != 200:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert status(url, "first-secret") == 401
    finally:
        stop_strobe_run(agent, log)
