"""On-demand captures riding on the daemon's sampler.

The daemon owns the only sampler. A pull request (`/debug/pprof/profile?seconds=N`) adds a
Tap; while any tap is open the window loop drains every second instead of once per window,
feeds each drain both to the window and to the open taps, and builds a tap's profile on the
loop's own thread when the tap's time is up (so symbolization stays single-threaded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.model import CPU, StackSample, Window

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

    def feed(self, window: Window, finish: Callable[[Tap], bytes]) -> None:
        """Give a drain to every open tap; finish the taps whose time is up."""
        now = time.monotonic()
        with self._lock:
            taps = list(self._taps)
            self._taps = [tap for tap in taps if tap.deadline > now]
        for tap in taps:
            tap.feed(window)
            if tap.deadline <= now:
                try:
                    tap.result = finish(tap)
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
