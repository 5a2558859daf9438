"""`strobe record`'s default symbolize wait: the file is due about 5 s after the duration."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from agent.commands.record import (
    BUILD_RESERVE,
    MIN_SYMBOLIZE_WAIT,
    RECORD_SLACK,
    default_symbolize_wait,
    process_age,
)


def test_the_wait_is_what_the_slack_leaves() -> None:
    now = time.monotonic()
    quick_start = default_symbolize_wait(started=now - 10.4, duration=10)  # 0.4 s to attach
    assert abs(quick_start - (RECORD_SLACK - BUILD_RESERVE - 0.4)) < 0.05
    # A slow start (a cold program cache) leaves no slack: the wait keeps its floor.
    assert default_symbolize_wait(started=now - 20, duration=10) == MIN_SYMBOLIZE_WAIT


def test_process_age_counts_from_the_exec() -> None:
    """A child that sleeps before asking is that much older: its imports count too."""
    script = (
        "import time; time.sleep(1.0)\n"
        "from agent.commands.record import process_age\n"
        "print(process_age())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 1.0 <= float(out.stdout) < 5.0, out.stdout
    assert process_age() > 0  # this test process started a while ago


def test_an_unreadable_stat_gives_no_age(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("garbage")
    assert process_age(tmp_path / "stat") == 0.0
    assert process_age(tmp_path / "missing") == 0.0
