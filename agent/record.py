"""`strobe record`: one profile of the whole host (or one process), written to a file."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from agent.config import Config
from agent.flamegraph import render_flamegraph
from agent.model import ProfileSample, Window
from agent.pipeline import Pipeline, build_pipeline
from agent.pprof.builder import build_pprof
from agent.session import merged_profile, window_profiles

log = logging.getLogger(__name__)

INDEX_BUDGET_SECONDS = 60.0  # one-shot: worth waiting for DWARF indexes, within reason


def countdown_line(remaining: float) -> str:
    return f"\rstrobe: recording, {max(0, round(remaining)):>4d} s left "


def wait_sampling(
    duration: float, stop: threading.Event, on_tick: Callable[[float, float], None]
) -> None:
    """Sample for `duration` seconds, calling on_tick(remaining, wait) about 5 times a second."""
    deadline = time.monotonic() + duration
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        on_tick(remaining, min(remaining, 0.2))


def sample_for(
    pipeline: Pipeline, duration: float, stop: threading.Event, show: TextIO | None
) -> Window:
    def tick(remaining: float, wait: float) -> None:
        if show is not None:
            show.write(countdown_line(remaining))
            show.flush()
        pipeline.capture_new_processes(timeout_ms=int(wait * 1000))

    pipeline.start()
    try:
        wait_sampling(duration, stop, tick)
        return pipeline.sampler.drain()
    finally:
        pipeline.close()
        if show is not None:
            show.write("\n")


def record(
    config: Config,
    duration: float,
    output: Path,
    pid: int | None,
    stop: threading.Event | None = None,
    tty: TextIO | None = None,
    flamegraph: Path | None = None,
) -> int:
    pipeline = build_pipeline(config, pid=pid, background_indexing=False)
    show = tty if tty is not None else (sys.stderr if sys.stderr.isatty() else None)
    window = sample_for(pipeline, duration, stop or threading.Event(), show)
    pipeline.prepare_now((s.pid for s in window.samples), budget_seconds=INDEX_BUDGET_SECONDS)
    profile = merged_profile(window_profiles(window, pipeline.stages, pipeline.period_ns))
    samples: list[ProfileSample] = list(profile.samples) if profile else []
    duration_ns = max(window.end_ns - window.start_ns, 1)
    data = (
        profile.pprof
        if profile
        else build_pprof([], window.start_ns, duration_ns, pipeline.period_ns)
    )
    write_atomically(output, data)
    if flamegraph is not None:
        title = f"strobe: pid {pid}" if pid else "strobe: all processes"
        write_atomically(flamegraph, render_flamegraph(samples, title=title).encode())
    count = sum(s.count for s in window.samples)
    print(f"strobe: wrote {output} ({count} samples, {len(data)} bytes)", file=sys.stderr)
    return 0


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
