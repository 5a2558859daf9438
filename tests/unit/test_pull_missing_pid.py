"""The pull endpoint refuses a pid that names no process, instead of an empty 200."""

from __future__ import annotations

import subprocess

from agent import metrics
from agent.admin.pull import PullEndpoint
from tests.conftest import metric_value


def test_missing_pid_is_a_404_with_one_line() -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names no process now
    calls: list[tuple[float, int | None]] = []

    def capture(seconds: float, pid: int | None, kind: str = "cpu") -> bytes:
        calls.append((seconds, pid))
        return b""

    before = metric_value(metrics.PULL_REQUESTS, result="not_found")
    status, content_type, body, *_ = PullEndpoint(capture)(
        {"seconds": ["1"], "pid": [str(child.pid)]}
    )
    assert status == 404 and content_type.startswith("text/plain")
    assert body == f"process {child.pid} does not exist\n".encode()
    assert calls == []  # nothing sampled for it
    assert metric_value(metrics.PULL_REQUESTS, result="not_found") == before + 1
