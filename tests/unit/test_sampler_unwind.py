"""The sampler's user-stack modes and the table walker's contract with the BPF source."""

from __future__ import annotations

from typing import Any

import pytest

from agent.sampler import sampler as sampler_module
from agent.sampler.convert import (
    EVENT_EXEC,
    EVENT_FIRST_SAMPLE,
    EVENT_PYTHON_CODE,
    EVENT_UNKNOWN_MAPPING,
    UNWIND_STATS,
    NewProcess,
    PidEvent,
    RawCount,
    distinct_pids,
    new_processes,
    to_stack_samples,
)
from agent.sampler.loader import _mapping_key, bpf_source_path
from agent.sampler.sampler import Sampler
from agent.unwind.mappings import Prefix
from agent.unwind.table import CfaKind

COMM = b"app\0" + b"\0" * 12


def enum_names(enum: str) -> list[str]:
    body = bpf_source_path().read_text().split(f"enum {enum} {{", 1)[1].split("};", 1)[0]
    code = " ".join(line.split("//")[0] for line in body.splitlines())
    return [name.strip() for name in code.split(",") if name.strip()]


def test_unwind_stats_match_the_bpf_enum() -> None:
    names = enum_names("unwind_stat")
    assert names[-1] == "UNWIND_STATS"
    assert len(names) - 1 == len(UNWIND_STATS)
    bpf_order = [n.removeprefix("STAT_").lower() for n in names[:-1]]
    assert bpf_order == [
        "table_frames",
        "fp_frames",
        "stack_end",
        "stopped",
        "truncated",
        "no_user_regs",
        "tail_call_failed",
        "no_route",
        "no_table",
        "py_frames",
        "py_no_thread",
        "py_unreadable",
        "py_truncated",
        "py_tail_call_failed",
    ]
    assert len(UNWIND_STATS) == len(bpf_order)
    assert [s.replace("python_", "py_") for s in UNWIND_STATS[9:]] == bpf_order[9:]
    assert UNWIND_STATS[1] == "frame_pointer_frames" and UNWIND_STATS[5] == "no_user_registers"


def test_pid_event_kinds_match_the_bpf_enum() -> None:
    names = enum_names("pid_event_kind")
    kinds = [EVENT_FIRST_SAMPLE, EVENT_EXEC, EVENT_UNKNOWN_MAPPING, EVENT_PYTHON_CODE]
    assert names == [
        "EVENT_FIRST_SAMPLE",
        "EVENT_EXEC",
        "EVENT_UNKNOWN_MAPPING",
        "EVENT_PYTHON_CODE",
    ]
    assert kinds == [0, 1, 2, 3]


def test_unknown_mapping_events_reread_the_process() -> None:
    """Code mapped since the capture (a dlopen): read the process again now, while it
    runs; a first sample's unknown code is the same capture, not a second read."""
    events = [
        PidEvent(4, EVENT_UNKNOWN_MAPPING),
        PidEvent(5, EVENT_FIRST_SAMPLE),
        PidEvent(5, EVENT_UNKNOWN_MAPPING),  # a new process: nothing is routed yet
        PidEvent(4, EVENT_UNKNOWN_MAPPING),
        PidEvent(6, EVENT_EXEC),
    ]
    assert new_processes(events) == [
        NewProcess(4, reread=True),
        NewProcess(5, reread=False),
        NewProcess(6, reread=True),
    ]
    assert distinct_pids(events) == [4, 5, 6]


def test_cfa_kinds_match_the_bpf_enum() -> None:
    names = [n.removeprefix("CFA_") for n in enum_names("cfa_kind")]
    assert names == [kind.name for kind in sorted(CfaKind)]


def test_user_stack_hashes_resolve_in_their_own_map() -> None:
    kernel_stacks = {7: (0xFFFFFFFF81000010,)}
    user_stacks = {7: (0x401000, 0x401100), 1 << 62: (0x402000,)}  # same id 7, other map
    entries = [
        RawCount(0, 10, 7, 7, COMM, 3, 10),
        RawCount(0, 10, 1 << 62, -14, COMM, 2, 10),
        RawCount(0, 10, -28, 7, COMM, 1, 10),  # ENOSPC: the user stack map was full
    ]
    samples = to_stack_samples(entries, kernel_stacks, user_stacks)
    assert [(s.user_stack, s.kernel_stack, s.count) for s in samples] == [
        ((0x401000, 0x401100), (0xFFFFFFFF81000010,), 3),
        ((0x402000,), (), 2),
        ((), (0xFFFFFFFF81000010,), 1),
    ]


def test_mapping_keys_are_big_endian_after_a_native_prefix_length() -> None:
    key = _mapping_key(0x01020304, Prefix(0x7F0000001000, 20))
    assert key == (52).to_bytes(4, "little") + bytes.fromhex("01020304") + bytes.fromhex(
        "00007f0000001000"
    )


class _Refused(Exception):
    pass


def loads_with(monkeypatch: pytest.MonkeyPatch, dwarf_ok: bool) -> list[int]:
    """Record the unwind_rows of each load; a load with tables fails unless dwarf_ok."""
    calls: list[int] = []

    def load(*_args: Any, unwind_rows: int = 0, **_kwargs: Any) -> str:
        calls.append(unwind_rows)
        if unwind_rows and not dwarf_ok:
            raise _Refused("verifier said no")
        return "program"

    monkeypatch.setattr(sampler_module, "load_sampler_program", load)
    return calls


def test_auto_falls_back_to_frame_pointers_when_the_walker_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = loads_with(monkeypatch, dwarf_ok=False)
    assert Sampler(unwinder="auto", unwind_table_rows=5000)._load_program() == "program"
    assert calls == [5000, 0]


def test_dwarf_refuses_to_start_without_the_walker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = loads_with(monkeypatch, dwarf_ok=False)
    with pytest.raises(_Refused):
        Sampler(unwinder="dwarf")._load_program()
    assert len(calls) == 1


def test_fp_never_builds_the_walker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = loads_with(monkeypatch, dwarf_ok=True)
    Sampler(unwinder="fp")._load_program()
    assert calls == [0]
    assert Sampler(unwinder="fp").unwind_mode == "fp"
    assert Sampler(unwinder="fp").unwind_tables is None
