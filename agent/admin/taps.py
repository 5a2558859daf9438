"""On-demand captures riding on the daemon's sampler.

The daemon owns the only sampler. A pull request (`/debug/pprof/profile?seconds=N`, served
by pull.py) opens a Tap and waits (`TapSet.capture`); while any tap is open the window loop
drains every second instead of once per window (`TapSet.drain_by`), feeds each drain both to
the window and to the open taps (`TapSet.feed`), and a tap's profile is built on the loop's
own thread when the tap's time is up (so symbolization stays single-threaded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from agent.model import CPU, OFF_CPU, Location, ProfileSample, StackSample, Window
from agent.pprof.builder import build_pprof
from agent.window_flow import profile_samples

if TYPE_CHECKING:
    from agent.pipeline import Pipeline

TAP_TICK_SECONDS = 1.0  # drain this often while an on-demand capture is open

SampleKey = tuple[int, int, str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def merge_stacks(stacks: Iterable[StackSample]) -> tuple[StackSample, ...]:
    """Identical stacks as one, their counts and nanoseconds summed."""
    totals: dict[SampleKey, list[int]] = {}
    for s in stacks:
        key = (s.pid, s.tid, s.comm, s.user_stack, s.kernel_stack, s.python_stack)
        total = totals.setdefault(key, [0, 0])
        total[0] += s.count
        total[1] += s.nanoseconds
    return tuple(
        StackSample(k[0], k[1], k[2], k[3], k[4], count, k[5], nanoseconds)
        for k, (count, nanoseconds) in totals.items()
    )


def merge_windows(windows: Iterable[Window]) -> Window | None:
    """One window covering several drains; identical stacks have their counts summed."""
    windows = list(windows)
    if not windows:
        return None
    lost: dict[str, int] = {}
    for window in windows:
        for reason, value in window.lost.items():
            lost[reason] = lost.get(reason, 0) + value
    return Window(
        start_ns=min(w.start_ns for w in windows),
        end_ns=max(w.end_ns for w in windows),
        samples=merge_stacks(s for w in windows for s in w.samples),
        lost=lost,
        off_cpu=merge_stacks(s for w in windows for s in w.off_cpu),
    )


@dataclass
class Tap:
    """One capture in progress: the samples of `pid` (or all) until `deadline`."""

    deadline: float  # time.monotonic()
    pid: int | None
    kind: str = CPU  # which profile the capture answers with
    start_ns: int = field(default_factory=time.time_ns)
    windows: list[Window] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: bytes | None = None
    error: str | None = None

    def feed(self, window: Window) -> None:
        if self.pid is not None:
            samples = tuple(s for s in window.samples if s.pid == self.pid)
            off_cpu = tuple(s for s in window.off_cpu if s.pid == self.pid)
            window = Window(window.start_ns, window.end_ns, samples, window.lost, off_cpu)
        self.windows.append(window)


class TapSet:
    """Open taps, shared by the HTTP thread (adds, waits) and the window loop (feeds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taps: list[Tap] = []

    def open(self, seconds: float, pid: int | None, kind: str = CPU) -> Tap:
        tap = Tap(deadline=time.monotonic() + seconds, pid=pid, kind=kind)
        with self._lock:
            self._taps.append(tap)
        return tap

    def active(self) -> bool:
        with self._lock:
            return bool(self._taps)

    def capture(self, seconds: float, pid: int | None, kind: str) -> bytes:
        """A capture for the HTTP thread: open a tap, wait until the window loop finished it."""
        return wait_for(self.open(seconds, pid, kind), seconds)

    def drain_by(self, window_end: float) -> float:
        """When the window loop should drain next: at `window_end`, or within a tick while
        a capture is open (time.monotonic())."""
        if self.active():
            return min(window_end, time.monotonic() + TAP_TICK_SECONDS)
        return window_end

    def feed(self, window: Window, pipeline: Pipeline) -> None:
        """Give a drain to every open tap; finish the taps whose time is up."""
        now = time.monotonic()
        with self._lock:
            taps = list(self._taps)
            self._taps = [tap for tap in taps if tap.deadline > now]
        for tap in taps:
            tap.feed(window)
            if tap.deadline <= now:
                try:
                    tap.result = tap_profile(pipeline, tap)
                except Exception as exc:  # the requester gets a 500, the loop goes on
                    tap.error = f"{type(exc).__name__}: {exc}"
                tap.done.set()

    def cancel_all(self, reason: str) -> None:
        with self._lock:
            taps, self._taps = self._taps, []
        for tap in taps:
            tap.error = reason
            tap.done.set()


def wait_for(tap: Tap, seconds: float) -> bytes:
    """Block the HTTP thread until the loop finished the tap (with a safety margin)."""
    if not tap.done.wait(seconds + 60):
        raise TimeoutError("the capture did not finish in time")
    if tap.result is None:
        raise RuntimeError(tap.error or "capture failed")
    return tap.result


def tap_profile(pipeline: Pipeline, tap: Tap) -> bytes:
    """The pprof of one on-demand capture (built on the window loop's thread)."""
    window = merge_windows(tap.windows) or Window(tap.start_ns, time.time_ns(), ())
    duration = max(window.end_ns - tap.start_ns, 1)
    stacks = window.off_cpu if tap.kind == OFF_CPU else window.samples
    samples = [s for group in profile_samples(stacks, pipeline.stages).values() for s in group]
    samples = without_kernel_addresses(samples)  # served over HTTP: no KASLR leak
    period_ns = 0 if tap.kind == OFF_CPU else pipeline.period_ns
    return build_pprof(samples, tap.start_ns, duration, period_ns, tap.kind)


def without_kernel_addresses(samples: Iterable[ProfileSample]) -> list[ProfileSample]:
    """The samples with every kernel location's address set to 0.

    A raw kernel text address gives away the KASLR base that /proc/kallsyms hides from
    unprivileged users; a named frame keeps its function name, which is all pprof shows.
    Each Location object maps to one replacement, so the builder still shares them."""
    scrubbed: dict[int, Location] = {}

    def scrub(location: Location) -> Location:
        if not location.kernel or location.address == 0:
            return location
        found = scrubbed.get(id(location))
        if found is None:
            found = scrubbed[id(location)] = replace(location, address=0)
        return found

    return [
        replace(sample, locations=tuple(scrub(loc) for loc in sample.locations))
        for sample in samples
    ]
