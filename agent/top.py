"""`strobe top`: the hottest functions right now, refreshed every interval.

Self and cumulative shares by function name, as `perf top` and `pprof -top` show them:
self counts the leaf (the innermost inline frame of the first location), cumulative
counts every function on the stack once per sample, so recursion is not counted twice.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from agent.config import Config
from agent.flamegraph import location_names, stack_names
from agent.model import ProfileSample
from agent.pipeline import build_pipeline
from agent.session import profile_samples

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase display
DEFAULT_LIMIT = 20  # rows when the output is not a terminal
DEFAULT_WIDTH = 120
NUMBERS_WIDTH = 34  # the four numeric columns and their spacing

# seconds -> the samples taken during the next `seconds` (blocks that long).
CaptureWindow = Callable[[float], Sequence[ProfileSample]]


@dataclass(frozen=True)
class TopRow:
    function: str
    self_samples: int
    cum_samples: int
    self_percent: float  # of all samples in the window
    cum_percent: float


def hottest_functions(samples: Sequence[ProfileSample], limit: int) -> list[TopRow]:
    """The `limit` functions with the most self samples (then cumulative, then name)."""
    self_counts: Counter[str] = Counter()
    cum_counts: Counter[str] = Counter()
    total = 0
    for sample in samples:
        if sample.count <= 0 or not sample.locations:
            continue
        total += sample.count
        self_counts[location_names(sample.locations[0])[0]] += sample.count
        for name in set(stack_names(sample)):
            cum_counts[name] += sample.count
    if total == 0:
        return []
    ranked = sorted(cum_counts, key=lambda name: (-self_counts[name], -cum_counts[name], name))
    return [
        TopRow(
            function=name,
            self_samples=self_counts[name],
            cum_samples=cum_counts[name],
            self_percent=100.0 * self_counts[name] / total,
            cum_percent=100.0 * cum_counts[name] / total,
        )
        for name in ranked[: max(limit, 0)]
    ]


def render_table(rows: Sequence[TopRow], width: int, header: str) -> str:
    """`header`, a column line and one line per row, each cut to `width` characters."""
    lines = [*header.splitlines(), f"{'SELF%':>7} {'SELF':>9} {'CUM%':>7} {'CUM':>9}  FUNCTION"]
    for row in rows:
        lines.append(
            f"{row.self_percent:>6.2f}% {row.self_samples:>9,} "
            f"{row.cum_percent:>6.2f}% {row.cum_samples:>9,}  {row.function}"
        )
    if not rows:
        lines.append("(no samples in this interval)")
    return "".join(line[: max(width, 1)] + "\n" for line in lines)


def top_header(pid: int | None, samples: Sequence[ProfileSample], interval: float) -> str:
    scope = f"pid {pid}" if pid is not None else "all processes"
    total = sum(sample.count for sample in samples if sample.count > 0)
    clock = time.strftime("%H:%M:%S")
    return f"strobe top - {clock} - {scope}: {total:,} samples in the last {interval:g} s"


def screen_size(out: TextIO, tty: bool) -> tuple[int, int]:
    """(columns, rows of functions) that fit the terminal, or defaults for a pipe/file."""
    if not tty:
        return DEFAULT_WIDTH, DEFAULT_LIMIT
    columns, lines = shutil.get_terminal_size((DEFAULT_WIDTH, DEFAULT_LIMIT + 3))
    return columns, max(lines - 3, 1)  # header, column names, the cursor's line


def run_top(
    capture_window: CaptureWindow,
    interval: float = 1.0,
    pid: int | None = None,
    out: TextIO = sys.stdout,
    iterations: int | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Show the hottest functions every `interval` s until `stop` or `iterations` refreshes."""
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval}")
    stop = stop or threading.Event()
    tty = out.isatty()
    done = 0
    while not stop.is_set() and (iterations is None or done < iterations):
        samples = capture_window(interval)
        if stop.is_set():  # interrupted mid-window: do not draw a partial one
            break
        width, limit = screen_size(out, tty)
        table = render_table(
            hottest_functions(samples, limit), width, top_header(pid, samples, interval)
        )
        out.write((CLEAR_SCREEN if tty else ("\n" if done else "")) + table)
        out.flush()
        done += 1


def run_top_command(
    config: Config,
    interval: float,
    pid: int | None,
    iterations: int | None,
    stop: threading.Event,
) -> int:
    """`strobe top`: a pipeline drained every `interval` seconds, shown as a table."""
    pipeline = build_pipeline(config, pid=pid)

    def capture_window(seconds: float) -> list[ProfileSample]:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            pipeline.capture_new_processes(timeout_ms=100)
        window = pipeline.sampler.drain()
        samples = profile_samples(window, pipeline.stages)
        pipeline.end_window()
        return [sample for group in samples.values() for sample in group]

    pipeline.start()
    try:
        run_top(capture_window, interval=interval, pid=pid, iterations=iterations, stop=stop)
    finally:
        pipeline.close()
    return 0
