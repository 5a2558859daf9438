"""A real `strobe run` as a child process for integration tests: started with a log file,
stopped with SIGTERM (it must exit 0), killed if it does not."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def start_strobe_run(
    tmp_path: Path,
    log: Path,
    port: int,
    *extra: str,
    store: Path | None = None,
    window: str = "2s",
) -> subprocess.Popen[bytes]:
    with log.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--window", window]
            + ["--local-store", str(store or tmp_path / "store")]
            + ["--cache-dir", str(tmp_path / "cache"), "--http-address", f"127.0.0.1:{port}"]
            + list(extra),
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop_strobe_run(agent: subprocess.Popen[bytes], log: Path) -> None:
    agent.send_signal(signal.SIGTERM)
    try:
        assert agent.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
