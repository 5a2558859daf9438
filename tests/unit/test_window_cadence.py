"""WindowLoop keeps a fixed cadence: slow processing of one window does not stretch the next.

The loop's clock is a fake that moves only when the fake pipeline spends time (polling for
new processes, processing a window), so the drain times are exact whatever else the
machine is doing: no wall-clock sleeps, no tolerance for a loaded host.
"""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.commands import daemon
from agent.commands.daemon import WindowLoop
from agent.model import Window
from agent.window_flow import Stages

WINDOW = 0.5
PROCESSING = 0.35  # each window's processing takes most of a window
POLL = 0.02  # what one wait for new processes costs: a drain is due at most this late


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """WindowLoop's time.monotonic, as a FakeClock."""
    fake = FakeClock()
    monkeypatch.setattr(daemon, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


class FakeSampler:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.drained_at: list[float] = []

    def drain(self) -> Window:
        self.drained_at.append(self.clock.monotonic())
        return Window(start_ns=0, end_ns=0, samples=())


class SlowPipeline:
    """The attributes WindowLoop uses; end_window stands for a window's slow processing."""

    def __init__(self, clock: FakeClock, processing: float = PROCESSING) -> None:
        self.clock = clock
        self.processing = processing
        self.sampler = FakeSampler(clock)
        self.stages = Stages(
            resolve_process=lambda pid, addresses: None,
            symbolize=lambda process, user, kernel: [],
            series_labels=lambda process, sample: None,
        )
        self.period_ns = 10**9 // 19

    def capture_new_processes(self, timeout_ms: int) -> None:
        self.clock.spend(min(timeout_ms / 1000, POLL))

    def end_window(self) -> None:
        self.clock.spend(self.processing)


def test_windows_end_on_a_cadence_despite_slow_processing(clock: FakeClock) -> None:
    pipeline = SlowPipeline(clock)
    loop = WindowLoop(cast(Any, pipeline), [], WINDOW, threading.Event())
    assert loop.run(max_windows=5) == 5
    gaps = [b - a for a, b in itertools.pairwise(pipeline.sampler.drained_at)]
    # Cadence: drains WINDOW apart. Without it each gap would be WINDOW + PROCESSING.
    assert len(gaps) == 4
    assert all(abs(gap - WINDOW) <= POLL + 1e-9 for gap in gaps), gaps


def test_processing_longer_than_a_window_drains_at_once_then_resumes(clock: FakeClock) -> None:
    pipeline = SlowPipeline(clock, processing=1.2)  # longer than a window: the next is overdue
    loop = WindowLoop(cast(Any, pipeline), [], WINDOW, threading.Event())
    loop.run(max_windows=3)
    # No burst of catch-up windows: each overdue window drains once, right after processing.
    gaps = [b - a for a, b in itertools.pairwise(pipeline.sampler.drained_at)]
    assert len(gaps) == 2
    assert gaps == pytest.approx([1.2, 1.2]), gaps
