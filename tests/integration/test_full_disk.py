"""A real `strobe run` whose local store's disk fills up: /readyz says so, with the reason,
while the disk refuses profiles, and says ready again once it takes them."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.strobe_run import start_strobe_run, stop_strobe_run
from tests.integration.test_pull_auth import free_port


def readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def wait_until(
    condition: Callable[[], bool], what: str, agent: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 150
    while not condition():
        assert agent.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{what}; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real filesystem that runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_readiness_follows_a_full_disk(require_bpf: None, small_disk: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "agent.log"
    store, filler = small_disk / "store", small_disk / "filler"
    agent = start_strobe_run(tmp_path, log, port, store=store)
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        wait_until(lambda: readyz(url)[0] == 200, "never ready", agent, log)
        # Fill the disk: the next window's write fails with ENOSPC.
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        wait_until(lambda: readyz(url)[0] == 503, "still ready with a full disk", agent, log)
        status, body = readyz(url)
        assert "No space left on device" in body and str(store) in body, body
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'strobe_sink_ready{sink="local"} 0.0' in metrics
        filler.unlink()
        wait_until(
            lambda: readyz(url)[0] == 200, "not ready again after space came back", agent, log
        )
    finally:
        stop_strobe_run(agent, log)


def test_profiles_lost_at_shutdown_make_a_failing_exit(
    require_bpf: None, small_disk: Path, tmp_path: Path
) -> None:
    """Stopped while the disk is still full: the backlog cannot be written, so the exit
    says so (1, one line) instead of 0: a supervisor (systemd) shows the unit failed."""
    port, log = free_port(), tmp_path / "agent.log"
    store, filler = small_disk / "store", small_disk / "filler"
    agent = start_strobe_run(tmp_path, log, port, store=store)
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        wait_until(lambda: readyz(url)[0] == 200, "never ready", agent, log)
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        wait_until(lambda: readyz(url)[0] == 503, "still ready with a full disk", agent, log)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 1, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    lines = [line for line in log.read_text().splitlines() if line.startswith("strobe: ")]
    assert len(lines) == 1 and "profiles lost at shutdown" in lines[0], lines
    assert "Traceback" not in log.read_text()
