"""The per-window flow: one drained Window in, one profile per series out.

sample (Window) -> resolve process -> symbolize (-> Python frames merged in) -> label
-> build pprof -> SeriesProfile. A window with off-CPU intervals (--off-cpu) makes a
second set of profiles from them, kind OFF_CPU, their series told apart by a
`profile_type="off-cpu"` label. `window_profile` makes a window's series of one kind one
profile (`strobe record`); `profile_samples` stops before the pprof (`strobe top`, the
pull endpoint's tap).
The stages are passed in as small callables (`Stages`) so this module is pure glue,
testable without root; agent/pipeline.py composes the real ones.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent import metrics
from agent.model import (
    CPU,
    OFF_CPU,
    Location,
    ProcessInfo,
    ProfileSample,
    SeriesProfile,
    StackSample,
    Window,
)
from agent.pprof.builder import build_pprof
from agent.util.gcpause import cycle_collection_paused

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
# pid and its user stack (an address outside the known mappings triggers a re-read)
ResolveProcess = Callable[[int, tuple[int, ...]], ProcessInfo | None]
Symbolize = Callable[[ProcessInfo | None, tuple[int, ...], tuple[int, ...]], tuple[Location, ...]]
# Series labels for a process; None drops its samples (relabel "drop"/"keep").
SeriesLabels = Callable[[ProcessInfo | None, StackSample], Labels | None]
# pid, its symbolized stack and the Python walker's words -> the stack with Python frames
MergePython = Callable[[int, tuple[Location, ...], tuple[int, ...]], tuple[Location, ...]]


@dataclass(frozen=True)
class Stages:
    resolve_process: ResolveProcess
    symbolize: Symbolize
    series_labels: SeriesLabels
    merge_python: MergePython | None = None


def sample_labels(sample: StackSample, process: ProcessInfo | None, series: Labels) -> Labels:
    """Per-sample pprof labels: the series labels (so a profile copied out of the store,
    `strobe record` and a pull keep who ran it: `pprof -tagfocus=pod=...`), then pid and
    comm, which are per process and never series labels (unbounded)."""
    comm = sample.comm or (process.comm if process else "")
    own = {"comm": comm, "pid": str(sample.pid)}
    kept = {name: value for name, value in series if value and name not in own}
    return tuple(sorted((kept | own).items()))


PROFILE_TYPE_LABEL = "profile_type"  # off-CPU series carry it; on-CPU series keep their labels


def off_cpu_labels(labels: Labels) -> Labels:
    """The series' labels and profile_type="off-cpu" (over any relabeled profile_type)."""
    kept = [(name, value) for name, value in labels if name != PROFILE_TYPE_LABEL]
    return tuple(sorted((*kept, (PROFILE_TYPE_LABEL, OFF_CPU))))


def profile_samples(
    stacks: Sequence[StackSample], stages: Stages
) -> dict[Labels, list[ProfileSample]]:
    """Resolve, symbolize and label every stack (of one window), grouped by series."""
    by_series: dict[Labels, list[ProfileSample]] = defaultdict(list)
    labels_of: dict[tuple[int, str, Labels], Labels] = {}  # ~20 stacks per process a window
    with cycle_collection_paused():  # ~100,000 objects, no cycles: see agent/util/gcpause.py
        for sample in stacks:
            process = stages.resolve_process(sample.pid, sample.user_stack) if sample.pid else None
            series = stages.series_labels(process, sample)
            if series is None:
                continue
            locations = stages.symbolize(process, sample.user_stack, sample.kernel_stack)
            if sample.python_stack and stages.merge_python is not None:
                locations = stages.merge_python(sample.pid, locations, sample.python_stack)
            if not locations:
                continue
            labels = labels_of.get((sample.pid, sample.comm, series))
            if labels is None:
                labels = labels_of[sample.pid, sample.comm, series] = sample_labels(
                    sample, process, series
                )
            by_series[series].append(
                ProfileSample(locations, sample.count, labels, sample.pid, sample.nanoseconds)
            )
    return by_series


def window_profiles(window: Window, stages: Stages, period_ns: int) -> list[SeriesProfile]:
    """Turn one drained window into one SeriesProfile per series label set (and per
    series again for its off-CPU intervals, if any)."""
    started = time.monotonic()
    duration_ns = max(window.end_ns - window.start_ns, 1)
    profiles = []
    for labels, samples in sorted(profile_samples(window.samples, stages).items()):
        profiles.append(series_profile(labels, samples, window.start_ns, duration_ns, period_ns))
    for labels, samples in sorted(profile_samples(window.off_cpu, stages).items()):
        profiles.append(
            series_profile(
                off_cpu_labels(labels), samples, window.start_ns, duration_ns, 0, OFF_CPU
            )
        )
    metrics.WINDOW_SECONDS.observe(time.monotonic() - started)
    metrics.WINDOWS.inc()
    return profiles


def series_profile(
    labels: Labels,
    samples: Sequence[ProfileSample],
    start_ns: int,
    duration_ns: int,
    period_ns: int,
    kind: str = CPU,
) -> SeriesProfile:
    return SeriesProfile(
        labels=labels,
        start_ns=start_ns,
        duration_ns=duration_ns,
        period_ns=period_ns,
        samples=tuple(samples),
        pprof=build_pprof(samples, start_ns, duration_ns, period_ns, kind),
        kind=kind,
    )


def window_profile(
    window: Window, stages: Stages, period_ns: int, kind: str = CPU
) -> SeriesProfile | None:
    """All series of one kind in a window as one profile (`strobe record`): one pprof,
    not one per series first."""
    stacks = window.off_cpu if kind == OFF_CPU else window.samples
    by_series = profile_samples(stacks, stages)
    if not by_series:
        return None
    samples = [sample for _, group in sorted(by_series.items()) for sample in group]
    duration_ns = max(window.end_ns - window.start_ns, 1)
    period = 0 if kind == OFF_CPU else period_ns
    return series_profile((), samples, window.start_ns, duration_ns, period, kind)
