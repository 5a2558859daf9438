"""`strobe record`: one profile of the whole host (or one process), written to a file."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from agent.commands import startup_priority
from agent.config import Config, ConfigError
from agent.model import CPU, OFF_CPU, ProfileSample, SeriesProfile, Window
from agent.pipeline import Pipeline, build_pipeline
from agent.pprof.builder import build_pprof
from agent.render.flamegraph import render_flamegraph
from agent.util.atomic_file import write_atomically
from agent.window_flow import window_profile

log = logging.getLogger(__name__)

# Without --symbolize-wait the file is due RECORD_SLACK seconds after the duration
# (counted from the command's start), BUILD_RESERVE of them kept for naming the frames and
# encoding after the wait; the wait is at least MIN_SYMBOLIZE_WAIT (a cold program cache
# alone can spend the slack).
RECORD_SLACK = 5.0
BUILD_RESERVE = 1.5
MIN_SYMBOLIZE_WAIT = 1.0
PROGRESS_SECONDS = 0.5


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
    # Sampling at a raised priority would also raise whatever shares our session (a
    # workload started from the same shell) in the profile; symbolizing is waited on.
    startup_priority.end()
    try:
        wait_sampling(duration, stop, tick)
        startup_priority.again()
        return pipeline.sampler.drain()
    finally:
        # Only the sampler stops here: symbolizing still needs the rest (debuginfod).
        pipeline.sampler.close()
        if show is not None:
            show.write("\n")


def symbolized_profile(
    pipeline: Pipeline, window: Window, wait: float, show: TextIO | None, kind: str = CPU
) -> SeriesProfile | None:
    """The window as one profile, after at most `wait` seconds of indexing its binaries
    (DWARF, debuginfod). What is not ready then keeps its ELF name, or its address and
    mapping: the file is written on time, and a backend can symbolize the rest."""
    pids = sorted({s.pid for s in (window.off_cpu if kind == OFF_CPU else window.samples)})
    indexing = threading.Thread(
        target=index_quietly, args=(pipeline, pids, wait), name="record-index", daemon=True
    )
    indexing.start()  # a daemon: an index still building when time is up is left behind
    deadline = time.monotonic() + wait
    while indexing.is_alive() and (remaining := deadline - time.monotonic()) > 0:
        if show is not None:
            show.write(progress_line(pipeline))
            show.flush()
        indexing.join(min(remaining, PROGRESS_SECONDS))
    if show is not None:
        show.write(progress_line(pipeline) + "\n")
    if indexing.is_alive():
        log.warning("symbolize wait (%.3g s) spent: some frames keep ELF names or addresses", wait)
    return window_profile(window, pipeline.stages, pipeline.period_ns, kind)


def index_quietly(pipeline: Pipeline, pids: list[int], wait: float) -> None:
    """prepare_now on its own thread; once the profile is written and the pipeline closed
    under it, what it then meets is not worth a traceback on the user's terminal."""
    try:
        pipeline.prepare_now(pids, budget_seconds=wait)
    except Exception:
        log.debug("indexing after the symbolize wait ended", exc_info=True)


def progress_line(pipeline: Pipeline) -> str:
    symbolizer = pipeline.symbolizer
    total = symbolizer.binary_count()
    done = total - symbolizer.pending() - int(symbolizer.awaiting_downloads())
    return f"\rstrobe: symbolizing, {max(0, done)} of {total} binaries ready "


def record(
    config: Config,
    duration: float,
    output: Path,
    pid: int | None,
    stop: threading.Event | None = None,
    tty: TextIO | None = None,
    flamegraph: Path | None = None,
    symbolize_wait: float | None = None,
) -> int:
    started = time.monotonic() - process_age()
    check_outputs({"--output": output, "--flamegraph": flamegraph})
    kind = OFF_CPU if config.off_cpu else CPU
    pipeline = build_pipeline(config, pid=pid, background_indexing=False)
    show = tty if tty is not None else (sys.stderr if sys.stderr.isatty() else None)
    try:
        window = sample_for(pipeline, duration, stop or threading.Event(), show)
        wait = (
            default_symbolize_wait(started, duration) if symbolize_wait is None else symbolize_wait
        )
        profile = symbolized_profile(pipeline, window, wait, show, kind)
    finally:
        pipeline.close()
    samples: list[ProfileSample] = list(profile.samples) if profile else []
    duration_ns = max(window.end_ns - window.start_ns, 1)
    data = (
        profile.pprof
        if profile
        else build_pprof([], window.start_ns, duration_ns, pipeline.period_ns, kind)
    )
    files = {output: data}
    if flamegraph is not None:
        files[flamegraph] = flamegraph_of(samples, pid, kind).encode()
    for path, content in files.items():
        try:
            write_atomically(path, content)
        except OSError as exc:  # checked before sampling, but the disk may have filled since
            print(f"strobe: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if kind == OFF_CPU:
        blocked = sum(s.nanoseconds for s in window.off_cpu) / 1e9
        what = f"{sum(s.count for s in window.off_cpu)} blocked intervals, {blocked:.3g} s"
    else:
        what = f"{sum(s.count for s in window.samples)} samples"
    print(f"strobe: wrote {output} ({what}, {len(data)} bytes)", file=sys.stderr)
    return 0


def process_age(stat: Path = Path("/proc/self/stat")) -> float:
    """Seconds since this process started (its imports count against the slack too)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, ticks after boot
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def default_symbolize_wait(started: float, duration: float) -> float:
    """What remains of duration + RECORD_SLACK since `started`, less BUILD_RESERVE."""
    remaining = started + duration + RECORD_SLACK - BUILD_RESERVE - time.monotonic()
    return max(MIN_SYMBOLIZE_WAIT, remaining)


def flamegraph_of(samples: list[ProfileSample], pid: int | None, kind: str) -> str:
    """The SVG; an off-CPU one weighs each stack by its blocked time, in microseconds."""
    title = f"strobe: pid {pid}" if pid else "strobe: all processes"
    if kind != OFF_CPU:
        return render_flamegraph(samples, title=title)
    by_time = [replace(s, count=s.nanoseconds // 1000) for s in samples]
    return render_flamegraph(by_time, title=f"{title}, off-CPU", unit="µs blocked")


def output_problem(path: Path) -> str | None:
    """Why a profile could not be written to `path`, with what to do; None if it can."""
    try:
        if path.is_dir():
            return f"{path} is a directory; give a file name, e.g. {path / 'profile.pb.gz'}"
        if not path.parent.is_dir():
            return f"directory {path.parent} does not exist; create it or write elsewhere"
    except PermissionError:  # a directory on the way that we may not enter
        return f"cannot reach {path} (permission denied); choose a writable directory"
    try:  # a real file, as the write will make: access() says yes to root on /proc or a
        # read-only mount
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".strobe-check-"):
            pass
    except OSError as exc:
        return f"cannot write in {path.parent} ({exc.strerror}); choose a writable directory"
    return None


def check_outputs(outputs: dict[str, Path | None]) -> None:
    """Refuse unwritable outputs before sampling, not after the whole duration."""
    for flag, path in outputs.items():
        problem = None if path is None else output_problem(path)
        if problem is not None:
            raise ConfigError(f"flag {flag}: {problem}")
