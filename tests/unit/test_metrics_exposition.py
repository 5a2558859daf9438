"""What /metrics exposes beyond the agent's own series: process_* and strobe_build_info,
and no *_created timestamps."""

from __future__ import annotations

import platform

from prometheus_client import generate_latest

from agent import metrics


def test_standard_process_metrics_build_info_and_no_created_series() -> None:
    metrics.SAMPLES.inc(0)  # a counter exists: it would have a _created series
    text = generate_latest(metrics.REGISTRY).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
    assert "process_open_fds" in names
    assert not any(name.endswith("_created") for name in names), sorted(names)
    info = f'strobe_build_info{{python="{platform.python_version()}",version="'
    assert info in text and metrics.package_version() in text
