"""Pipeline.capture_new_processes against a fake /proc and scripted pid events: each new
process is read once, and an exec'd one is prepared for the walkers (unwind routes,
Python) only when it is sampled or has run `prepare_after` seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from agent.metrics import PROCESSES_SEEN
from agent.model import ProcessInfo
from agent.pipeline import Pipeline
from agent.process.cache import ProcessCache
from agent.sampler.convert import (
    EVENT_EXEC,
    EVENT_FIRST_SAMPLE,
    EVENT_UNKNOWN_MAPPING,
    NewProcess,
    PidEvent,
    new_processes,
)
from tests.conftest import metric_value
from tests.unit.test_process_reader import MAPS_A, MAPS_B, fake_proc

PREPARE_AFTER = 0.02
BATCH = 0.01


class ScriptedSampler:
    """The sampler's side of capture_new_processes: pid events in, unwind captures out."""

    def __init__(self) -> None:
        self.events: list[PidEvent] = []
        self.timeouts: list[int] = []
        self.prepared: list[tuple[ProcessInfo, bool]] = []  # (capture, urgent)

    def poll_new_processes(self, timeout_ms: int = 0) -> list[NewProcess]:
        self.timeouts.append(timeout_ms)
        events, self.events = self.events, []
        return new_processes(events)

    def prepare_unwind(self, process: ProcessInfo, urgent: bool = True) -> None:
        self.prepared.append((process, urgent))


class Clock:
    """Time that passes only when told to (or slept)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def pipeline_on(proc: Path) -> tuple[Pipeline, ScriptedSampler, Clock]:
    sampler, clock = ScriptedSampler(), Clock()
    unused = cast(Any, None)  # stages this step never reaches
    pipeline = Pipeline(
        sampler=cast(Any, sampler),
        processes=ProcessCache(proc=proc),
        symbolizer=unused,
        stages=unused,
        period_ns=1,
        guard=unused,
        labeler=unused,
        prepare_after=PREPARE_AFTER,
        batch_seconds=BATCH,
        clock=clock,
        sleep=clock.sleep,
    )
    return pipeline, sampler, clock


def poll(pipeline: Pipeline, sampler: ScriptedSampler, *events: PidEvent) -> None:
    sampler.events = list(events)
    pipeline.capture_new_processes(timeout_ms=200)


def execd(proc: Path, pid: int, comm: str) -> tuple[Pipeline, ScriptedSampler, Clock]:
    """A pipeline that has just seen `pid` exec (as `comm`)."""
    fake_proc(proc, pid, 100, comm, MAPS_A)
    pipeline, sampler, clock = pipeline_on(proc)
    poll(pipeline, sampler, PidEvent(pid, EVENT_EXEC))
    return pipeline, sampler, clock


def exit_process(proc: Path, pid: int) -> None:
    for path in (proc / str(pid)).iterdir():
        path.unlink()
    (proc / str(pid)).rmdir()


def test_an_execd_process_that_exits_before_it_is_due_is_captured_but_never_prepared(
    tmp_path: Path,
) -> None:
    pipeline, sampler, clock = execd(tmp_path, 7, "true")
    captured = pipeline.processes.get(7)
    assert captured is not None and captured.comm == "true"
    assert sampler.prepared == []
    exit_process(tmp_path, 7)
    clock.now += 1
    poll(pipeline, sampler)
    assert sampler.prepared == []
    assert pipeline.processes.get(7) is captured  # its samples are still named


def test_an_execd_process_still_running_when_due_is_read_again_and_prepared(
    tmp_path: Path,
) -> None:
    """The capture at exec predates the libraries the loader maps (libpython): the due
    process is read again, and prepared with that."""
    seen = metric_value(PROCESSES_SEEN)
    pipeline, sampler, clock = execd(tmp_path, 8, "make")
    assert sampler.timeouts == [200]
    poll(pipeline, sampler)  # nothing due yet: the poll waits only until it is
    assert sampler.prepared == [] and 0 < sampler.timeouts[-1] <= PREPARE_AFTER * 1000 + 1
    clock.now += PREPARE_AFTER
    poll(pipeline, sampler)
    assert sampler.prepared == [(pipeline.processes.get(8), True)]
    assert metric_value(PROCESSES_SEEN) == seen + 2  # at exec, and when due
    clock.now += 1
    poll(pipeline, sampler)
    assert len(sampler.prepared) == 1
    assert sampler.timeouts[-1] == 200


def test_an_execd_process_meeting_unrouted_code_before_it_is_due_is_read_and_prepared_at_once(
    tmp_path: Path,
) -> None:
    """The walker's unknown-code event means code mapped since the capture at exec (a
    shared library): read again, prepared at once (CI: a 0.5 s Python process got Python
    frames in 8% of its samples when the exec-time capture, without libpython, was
    reused)."""
    seen = metric_value(PROCESSES_SEEN)
    pipeline, sampler, clock = execd(tmp_path, 9, "cc1")
    poll(pipeline, sampler, PidEvent(9, EVENT_UNKNOWN_MAPPING))
    assert sampler.prepared == [(pipeline.processes.get(9), True)]
    assert metric_value(PROCESSES_SEEN) == seen + 2
    clock.now += 1
    poll(pipeline, sampler)
    assert len(sampler.prepared) == 1  # not again when its time would have come


def test_a_second_exec_before_it_is_due_is_read_again_and_prepared_as_the_new_image(
    tmp_path: Path,
) -> None:
    pipeline, sampler, _ = execd(tmp_path, 10, "sh")
    fake_proc(tmp_path, 10, 100, "b", MAPS_B)  # `exec b` at once
    poll(pipeline, sampler, PidEvent(10, EVENT_EXEC), PidEvent(10, EVENT_UNKNOWN_MAPPING))
    ((prepared, urgent),) = sampler.prepared
    assert (prepared.comm, prepared.mappings[0].path, urgent) == ("b", "/bin/b", True)


def test_a_process_first_seen_at_a_tick_is_prepared_at_once_behind_new_code(
    tmp_path: Path,
) -> None:
    fake_proc(tmp_path, 11, 100, "sshd", MAPS_A)
    pipeline, sampler, _ = pipeline_on(tmp_path)
    poll(pipeline, sampler, PidEvent(11, EVENT_FIRST_SAMPLE))
    assert sampler.prepared == [(pipeline.processes.get(11), False)]


def test_pid_events_that_keep_coming_are_handled_in_batches_not_one_wake_up_each(
    tmp_path: Path,
) -> None:
    for pid in (20, 21, 22):
        fake_proc(tmp_path, pid, 100, "true", MAPS_A)
    pipeline, sampler, clock = pipeline_on(tmp_path)
    poll(pipeline, sampler)  # quiet: no wait before the poll
    poll(pipeline, sampler, PidEvent(20, EVENT_FIRST_SAMPLE))
    assert clock.slept == []
    clock.now += BATCH / 4
    poll(pipeline, sampler, PidEvent(21, EVENT_FIRST_SAMPLE))  # right after a batch
    assert clock.slept == [pytest.approx(BATCH * 3 / 4)]  # waited out the batch time first
    clock.now += BATCH / 2
    sampler.events = [PidEvent(22, EVENT_FIRST_SAMPLE)]
    pipeline.capture_new_processes(timeout_ms=2)  # never longer than the caller allows
    assert clock.slept[-1] == pytest.approx(0.002) and sampler.timeouts[-1] == 0
    assert [p.pid for p, _ in sampler.prepared] == [20, 21, 22]
    clock.now += 1
    poll(pipeline, sampler)  # a second after the last batch: no wait
    assert len(clock.slept) == 2
