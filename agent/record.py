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
from agent.pipeline import build_pipeline
from agent.pprof.builder import build_pprof
from agent.session import merged_profile, window_profiles

log = logging.getLogger(__name__)


def countdown_line(remaining: float) -> str:
    return f"\rstrobe: recording, {max(0, round(remaining)):>4d} s left "


def wait_sampling(
    duration: float, stop: threading.Event, on_tick: Callable[[float, float], None]
) -> None:
    """Sample for `duration` seconds, calling on_tick about 5 times a second."""
    deadline = time.monotonic() + duration
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        on_tick(remaining, min(remaining, 0.2))


def record(
    config: Config,
    duration: float,
    output: Path,
    pid: int | None,
    stop: threading.Event | None = None,
    tty: TextIO | None = None,
) -> int:
    stop = stop or threading.Event()
    pipeline = build_pipeline(config, pid=pid)
    show = tty if tty is not None else (sys.stderr if sys.stderr.isatty() else None)
    pipeline.start()
    start_ns = time.time_ns()
    try:

        def tick(remaining: float, wait: float) -> None:
            if show is not None:
                show.write(countdown_line(remaining))
                show.flush()
            pipeline.capture_new_processes(timeout_ms=int(wait * 1000))

        wait_sampling(duration, stop, tick)
        window = pipeline.sampler.drain()
    finally:
        pipeline.close()
    if show is not None:
        show.write("\n")
    profile = merged_profile(window_profiles(window, pipeline.stages, pipeline.period_ns))
    data = (
        profile.pprof
        if profile
        else build_pprof([], start_ns, max(time.time_ns() - start_ns, 1), pipeline.period_ns)
    )
    write_atomically(output, data)
    samples = sum(s.count for s in window.samples)
    print(f"strobe: wrote {output} ({samples} samples, {len(data)} bytes)", file=sys.stderr)
    return 0


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
