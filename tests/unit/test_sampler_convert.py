"""Pure conversions of raw sampler map contents (no root, no bcc)."""

from __future__ import annotations

from agent.model import StackSample
from agent.sampler.convert import (
    EVENT_EXEC,
    EVENT_FIRST_SAMPLE,
    EVENT_UNKNOWN_MAPPING,
    LOST_REASONS,
    SAMPLE_LOSS_REASONS,
    NewProcess,
    PidEvent,
    RawCount,
    decode_comm,
    entries_of_slot,
    fill_ratio,
    lost_deltas,
    new_processes,
    stack_addresses,
    to_stack_samples,
)
from agent.sampler.loader import bpf_source_path

EFAULT, EEXIST = 14, 17


def raw(
    pid: int = 100,
    user: int = 1,
    kernel: int = -EFAULT,
    count: int = 1,
    comm: bytes = b"spin\0\0\0\0\0\0\0\0\0\0\0\0",
    slot: int = 0,
    tid: int = 0,
) -> RawCount:
    return RawCount(slot, pid, user, kernel, comm, count, tid or pid)


def test_decode_comm_stops_at_nul_and_survives_bad_utf8() -> None:
    assert decode_comm(b"python3\0\0\0garbage") == "python3"
    assert decode_comm(b"x" * 16) == "x" * 16
    assert decode_comm(b"\xff\xfeab\0") == "\ufffd\ufffdab"


def test_stack_addresses_stop_at_first_zero() -> None:
    assert stack_addresses([0x10, 0x20, 0, 0x30]) == (0x10, 0x20)
    assert stack_addresses([0] * 127) == ()


def test_stack_ids_resolve_innermost_first_and_errors_to_empty() -> None:
    stacks = {1: (0x401000, 0x401100, 0x401200), 2: (0xFFFFFFFF81000000,)}
    samples = to_stack_samples(
        [raw(user=1, kernel=2, count=5), raw(pid=7, user=-EFAULT, kernel=2, count=2)], stacks
    )
    assert samples == (
        StackSample(100, 100, "spin", (0x401000, 0x401100, 0x401200), (0xFFFFFFFF81000000,), 5),
        StackSample(7, 7, "spin", (), (0xFFFFFFFF81000000,), 2),
    )


def test_entries_that_resolve_alike_merge_and_keep_one_tid() -> None:
    stacks = {1: (0x10,)}
    samples = to_stack_samples(
        [
            raw(user=1, kernel=-EFAULT, count=3, tid=101),
            raw(user=1, kernel=-EEXIST, count=4, tid=102),  # lost kernel stack: same as none
            raw(user=9, kernel=-EFAULT, count=1, tid=103),  # id missing from the map
            raw(user=-EFAULT, kernel=-EFAULT, count=2, tid=104),
        ],
        stacks,
    )
    assert [(s.user_stack, s.count) for s in samples] == [((0x10,), 7), ((), 3)]
    assert samples[0].tid == 101 and samples[1].tid in (103, 104)
    assert sum(s.count for s in samples) == 10  # nothing lost, nothing doubled


def test_different_comm_or_pid_stay_apart_and_zero_counts_drop() -> None:
    samples = to_stack_samples(
        [
            raw(comm=b"a\0"),
            raw(comm=b"b\0"),
            raw(pid=200, comm=b"a\0"),
            raw(pid=300, count=0),
        ],
        {1: (0x10,)},
    )
    assert sorted((s.pid, s.comm) for s in samples) == [(100, "a"), (100, "b"), (200, "a")]


def test_samples_order_is_deterministic() -> None:
    entries = [raw(pid=p, count=c) for p, c in [(3, 1), (1, 5), (2, 5)]]
    stacks = {1: (0x10,)}
    forward = to_stack_samples(entries, stacks)
    assert forward == to_stack_samples(list(reversed(entries)), stacks)
    assert [s.pid for s in forward] == [1, 2, 3]


def test_entries_of_slot() -> None:
    entries = [raw(slot=0, pid=1), raw(slot=1, pid=2), raw(slot=0, pid=3)]
    assert [e.pid for e in entries_of_slot(entries, 0)] == [1, 3]
    assert [e.pid for e in entries_of_slot(entries, 1)] == [2]


def test_lost_deltas_by_reason() -> None:
    before = (1, 0, 0, 5, 0, 0)
    after = (4, 0, 2, 5, 0, 9)
    assert lost_deltas(before, after) == {
        "counts_map_full": 3,
        "user_stack_collision": 0,
        "user_stack_error": 2,
        "kernel_stack_collision": 0,
        "kernel_stack_error": 0,
        "pid_event_dropped": 9,
    }
    assert lost_deltas((), after)["counts_map_full"] == 4  # first read: all of it
    assert lost_deltas(after, before)["user_stack_error"] == 0  # never negative


def test_loss_reasons_match_the_bpf_enum() -> None:
    source = bpf_source_path().read_text()
    enum_body = source.split("enum lost_reason {", 1)[1].split("};", 1)[0]
    names = [line.strip().rstrip(",") for line in enum_body.splitlines() if line.strip()]
    assert names[-1] == "LOST_REASONS"
    assert [n.removeprefix("LOST_").lower() for n in names[:-1]] == [
        "counts_full",
        "user_stack_collision",
        "user_stack_error",
        "kernel_stack_collision",
        "kernel_stack_error",
        "pid_event",
    ]
    assert len(LOST_REASONS) == len(names) - 1
    assert set(SAMPLE_LOSS_REASONS) < set(LOST_REASONS)
    assert "pid_event_dropped" not in SAMPLE_LOSS_REASONS


def test_new_processes_dedupe_in_order_and_mark_changed_images() -> None:
    events = [
        PidEvent(5, EVENT_EXEC),
        PidEvent(3, EVENT_FIRST_SAMPLE),
        PidEvent(5, EVENT_FIRST_SAMPLE),
        PidEvent(9, EVENT_EXEC),
        PidEvent(7, EVENT_UNKNOWN_MAPPING),  # code mapped since its capture: read it again
    ]
    assert new_processes(events) == [
        NewProcess(5, reread=True),
        NewProcess(3, reread=False),
        NewProcess(9, reread=True),
        NewProcess(7, reread=True),
    ]
    # New code runs in 5, 9 and 7 (tables before the backlog); 3, 5 and 7 ran at a tick,
    # while 9 was only seen exec'ing (it may exit before any tick); 5 and 9 exec'd.
    flags = {new.pid: (new.urgent, new.sampled, new.execed) for new in new_processes(events)}
    assert flags == {
        5: (True, True, True),
        3: (False, True, False),
        9: (True, False, True),
        7: (True, True, False),
    }
    assert new_processes([]) == []


def test_fill_ratio() -> None:
    assert fill_ratio(4096, 16384) == 0.25
    assert fill_ratio(3, 0) == 0.0
