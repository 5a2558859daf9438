"""WindowLoop keeps a fixed cadence: slow processing of one window does not stretch the next."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, cast

from agent.commands.daemon import WindowLoop
from agent.model import Window
from agent.window_flow import Stages

WINDOW = 0.5
PROCESSING = 0.35  # each window's processing takes most of a window


class FakeSampler:
    def __init__(self) -> None:
        self.drained_at: list[float] = []

    def drain(self) -> Window:
        self.drained_at.append(time.monotonic())
        now = time.time_ns()
        return Window(start_ns=now, end_ns=now, samples=())


class SlowPipeline:
    """The attributes WindowLoop uses; end_window stands for a window's slow processing."""

    def __init__(self, processing: float = PROCESSING) -> None:
        self.processing = processing
        self.sampler = FakeSampler()
        self.stages = Stages(
            resolve_process=lambda pid, addresses: None,
            symbolize=lambda process, user, kernel: [],
            series_labels=lambda process, sample: None,
        )
        self.period_ns = 10**9 // 19

    def capture_new_processes(self, timeout_ms: int) -> None:
        time.sleep(min(timeout_ms / 1000, 0.02))

    def end_window(self) -> None:
        time.sleep(self.processing)


def test_windows_end_on_a_cadence_despite_slow_processing() -> None:
    pipeline = SlowPipeline()
    loop = WindowLoop(cast(Any, pipeline), [], WINDOW, threading.Event())
    assert loop.run(max_windows=5) == 5
    gaps = [b - a for a, b in itertools.pairwise(pipeline.sampler.drained_at)]
    # Cadence: drains WINDOW apart. Without it each gap would be WINDOW + PROCESSING.
    assert len(gaps) == 4
    assert all(abs(gap - WINDOW) < 0.15 for gap in gaps), gaps


def test_processing_longer_than_a_window_drains_at_once_then_resumes() -> None:
    pipeline = SlowPipeline(processing=1.2)  # longer than a window: the next drain is overdue
    loop = WindowLoop(cast(Any, pipeline), [], WINDOW, threading.Event())
    loop.run(max_windows=3)
    # No burst of catch-up windows: each overdue window drains once, right after processing.
    gaps = [b - a for a, b in itertools.pairwise(pipeline.sampler.drained_at)]
    assert all(gap >= 1.2 - 0.05 for gap in gaps), gaps
    assert all(gap < 1.2 + WINDOW for gap in gaps), gaps
