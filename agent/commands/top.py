"""`strobe top`: the hottest functions right now, refreshed every interval.

Self and cumulative shares per process and function, as `perf top -s comm,sym` and
`pprof -top` show them: self counts the leaf (the innermost inline frame of the first
location), cumulative counts every function on the stack once per sample, so recursion is
not counted twice. An unnamed frame is its address, `0x401234 (app)`: when that address
was seen in one sample only, it says nothing on its own and joins its file's row, `[app]`.
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

from agent.commands import startup_priority
from agent.config import Config
from agent.model import ProfileSample
from agent.pipeline import build_pipeline
from agent.render.names import (
    FrameMemo,
    ProcessKey,
    StackFrame,
    process_comms,
    process_key,
    stack_frames,
)
from agent.window_flow import profile_samples

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase display
DEFAULT_LIMIT = 20  # rows when the output is not a terminal
DEFAULT_WIDTH = 120
PROCESS_WIDTH = 24  # at most: a 15-character comm, "/", a pid

# seconds -> the samples taken during the next `seconds` (blocks that long).
CaptureWindow = Callable[[float], Sequence[ProfileSample]]


@dataclass(frozen=True)
class TopRow:
    function: str
    self_samples: int
    cum_samples: int
    self_percent: float  # of all samples in the window
    cum_percent: float
    process: str = ""  # comm/pid


RowKey = tuple[str, str]  # (process, function)


def process_label(pid: int, comm: str) -> str:
    if comm and pid:
        return f"{comm}/{pid}"
    return comm or (str(pid) if pid else "?")


def process_labels(samples: Sequence[ProfileSample]) -> dict[ProcessKey, str]:
    """`comm/pid` of each process; its comm is the thread name most of its samples carry."""
    return {key: process_label(key[0], comm) for key, comm in process_comms(samples).items()}


def count_rows(
    stacks: Sequence[tuple[str, int, list[StackFrame]]], fold: dict[RowKey, str]
) -> tuple[Counter[RowKey], Counter[RowKey]]:
    """Self and cumulative samples per (process, function), `fold` renaming functions."""
    self_counts: Counter[RowKey] = Counter()
    cum_counts: Counter[RowKey] = Counter()
    for process, count, frames in stacks:
        leaf = frames[0].name
        self_counts[process, fold.get((process, leaf), leaf)] += count
        for name in {fold.get((process, frame.name), frame.name) for frame in frames}:
            cum_counts[process, name] += count
    return self_counts, cum_counts


def one_sample_unnamed(
    stacks: Sequence[tuple[str, int, list[StackFrame]]], cum_counts: Counter[RowKey]
) -> dict[RowKey, str]:
    """Unnamed rows seen in a single sample -> their mapping's row."""
    return {
        (process, frame.name): frame.mapping
        for process, _, frames in stacks
        for frame in frames
        if frame.kind == "unnamed" and cum_counts[process, frame.name] <= 1
    }


def hottest_functions(samples: Sequence[ProfileSample], limit: int) -> list[TopRow]:
    """The `limit` rows with the most self samples (then cumulative, function, process)."""
    processes = process_labels(samples)
    memo: FrameMemo = {}
    stacks = [
        (processes[process_key(sample)], sample.count, stack_frames(sample, memo))
        for sample in samples
        if sample.count > 0 and sample.locations
    ]
    total = sum(count for _, count, _ in stacks)
    if total == 0:
        return []
    _, unfolded_cum = count_rows(stacks, {})
    self_counts, cum_counts = count_rows(stacks, one_sample_unnamed(stacks, unfolded_cum))
    ranked = sorted(cum_counts, key=lambda key: (-self_counts[key], -cum_counts[key], key[::-1]))
    return [
        TopRow(
            function=function,
            self_samples=self_counts[process, function],
            cum_samples=cum_counts[process, function],
            self_percent=100.0 * self_counts[process, function] / total,
            cum_percent=100.0 * cum_counts[process, function] / total,
            process=process,
        )
        for process, function in ranked[: max(limit, 0)]
    ]


def render_table(rows: Sequence[TopRow], width: int, header: str) -> str:
    """`header`, a column line and one line per row, each cut to `width` characters."""
    process_width = min(max((len(row.process) for row in rows), default=0), PROCESS_WIDTH)
    process_width = max(process_width, len("PROCESS"))
    lines = [
        *header.splitlines(),
        f"{'SELF%':>7} {'SELF':>9} {'CUM%':>7} {'CUM':>9}  {'PROCESS':<{process_width}}  FUNCTION",
    ]
    for row in rows:
        process = row.process[:process_width]
        lines.append(
            f"{row.self_percent:>6.2f}% {row.self_samples:>9,} "
            f"{row.cum_percent:>6.2f}% {row.cum_samples:>9,}  "
            f"{process:<{process_width}}  {row.function}"
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
        samples = profile_samples(window.samples, pipeline.stages)
        pipeline.end_window()
        return [sample for group in samples.values() for sample in group]

    pipeline.start()
    startup_priority.end()
    try:
        run_top(capture_window, interval=interval, pid=pid, iterations=iterations, stop=stop)
    finally:
        pipeline.close()
    return 0
