"""Compile and load bpf/profile.bpf.c with bcc. The only module that imports bcc.

`load_sampler_program` returns a `SamplerProgram`: a narrow handle (attach, set the
slot and pid filter, read/delete map entries as plain values, poll pid events,
close). The rest of the sampler sees only this handle, so compilation can later move
into a short-lived child process (LLVM costs ~100 MB RSS) without touching it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.sampler.convert import (
    LOST_REASONS,
    UNWIND_STATS,
    PidEvent,
    RawCount,
    stack_addresses,
    swap_bytes,
)
from agent.sampler.kernel_headers import HeaderChoice, find_kernel_headers
from agent.unwind.mappings import MappingTarget, Prefix

log = logging.getLogger(__name__)

_REPO_BPF = Path(__file__).resolve().parents[2] / "bpf" / "profile.bpf.c"
_PACKAGED_BPF = Path(__file__).resolve().parents[1] / "bpf" / "profile.bpf.c"

CONTROL_SLOT = 0  # enum control_index in the BPF program
CONTROL_PID_FILTER = 1
DEFAULT_COUNTS_ENTRIES = 16384
DEFAULT_STACK_ENTRIES = 16384  # per slot; a stack-map entry is ~1 KiB (127 frames)
SEEN_ENTRIES = 65536
EVENT_PAGES = 64  # ring buffer of 256 KiB: ~16k pid events between polls
DEFAULT_UNWIND_ROWS = 2_000_000  # 8 bytes each: 16 MB of unwind table rows
DEFAULT_UNWIND_MAPPINGS = 262_144  # LPM trie entries (pid, address prefix); allocated on use
ROW_WRITE_BATCH = 65_536
MAPS = ("counts", "stacks0", "stacks1", "control", "lost", "seen", "pid_events")
UNWIND_MAPS = (
    "unwind_rows",
    "unwind_mappings",
    "user_stacks0",
    "user_stacks1",
    "unwind_state",
    "unwind_stats",
    "unwind_programs",
)


class _PidEventStruct(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("kind", ctypes.c_uint32)]


def bpf_source_path() -> Path:
    """bpf/profile.bpf.c of a source checkout, or agent/bpf/ when installed as a package."""
    return _PACKAGED_BPF if _PACKAGED_BPF.is_file() else _REPO_BPF


def load_sampler_program(
    frequency: int,
    pid_filter: int | None = None,
    *,
    counts_entries: int = DEFAULT_COUNTS_ENTRIES,
    stack_entries: int = DEFAULT_STACK_ENTRIES,
    unwind_rows: int = 0,
    headers: HeaderChoice | None = None,
) -> SamplerProgram:
    """Compile and load the sampler (not attached yet; call `attach()`).

    unwind_rows > 0 builds the table-driven user stack walker with that many rows;
    0 keeps frame-pointer user stacks only. Raises KernelHeadersError when no headers
    are usable, and bcc's exceptions when the kernel refuses the program.
    """
    if frequency <= 0:
        raise ValueError(f"sampling frequency must be positive, got {frequency}")
    headers = headers or find_kernel_headers()
    cflags = [
        f"-DCOUNTS_ENTRIES={counts_entries}",
        f"-DSTACK_ENTRIES={stack_entries}",
        f"-DSEEN_ENTRIES={SEEN_ENTRIES}",
        f"-DEVENT_PAGES={EVENT_PAGES}",
    ]
    if unwind_rows > 0:
        cflags += [
            "-DDWARF_UNWIND",
            f"-DUNWIND_ROWS={unwind_rows}",
            f"-DUNWIND_MAPPINGS={DEFAULT_UNWIND_MAPPINGS}",
        ]
    source = bpf_source_path().read_text()
    with _environment(headers.bcc_environment()):
        from bcc import BPF  # heavy (LLVM): imported only when compiling

        bpf = BPF(text=source.encode(), cflags=cflags)
    try:
        program = SamplerProgram(bpf, frequency, counts_entries, stack_entries, unwind_rows)
        program.set_pid_filter(pid_filter)
        if unwind_rows > 0:
            program.load_unwinder()  # the verifier's verdict, before anything is attached
    except BaseException:
        bpf.cleanup()
        raise
    return program


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a compile (bcc reads getenv)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class SamplerProgram:
    """The loaded BPF sampler: maps as plain values, attach/detach, pid events."""

    def __init__(
        self,
        bpf: Any,
        frequency: int,
        counts_entries: int,
        stack_entries: int,
        unwind_rows: int = 0,
    ):
        self._bpf = bpf
        self.frequency = frequency
        self.counts_capacity = counts_entries
        self.stacks_capacity = stack_entries
        self.unwind_rows_capacity = unwind_rows  # 0: frame pointers only
        self._counts = bpf[b"counts"]
        self._stacks = (bpf[b"stacks0"], bpf[b"stacks1"])
        self._user_stacks = (
            (bpf[b"user_stacks0"], bpf[b"user_stacks1"]) if unwind_rows else self._stacks
        )
        self._control = bpf[b"control"]
        self._lost = bpf[b"lost"]
        self._events: list[PidEvent] = []
        self._ring_open = False
        self._closed = False

    @property
    def table_unwinding(self) -> bool:
        return self.unwind_rows_capacity > 0

    def load_unwinder(self) -> None:
        """Verify and load the table walker and put it where on_cpu_clock tail-calls it."""
        from bcc import BPF

        walker = self._bpf.load_func(b"unwind_user", BPF.PERF_EVENT)
        self._bpf[b"unwind_programs"][ctypes.c_int(0)] = ctypes.c_int(walker.fd)

    def attach(self) -> None:
        """Start sampling every online CPU and watching exec/exit. Call once."""
        from bcc import PerfSWConfig, PerfType

        self._bpf[b"pid_events"].open_ring_buffer(self._on_pid_event)
        self._ring_open = True
        # Raw tracepoints: unlike tracepoints they need no mounted tracefs.
        self._bpf.attach_raw_tracepoint(tp=b"sched_process_exec", fn_name=b"on_exec")
        self._bpf.attach_raw_tracepoint(tp=b"sched_process_exit", fn_name=b"on_exit")
        self._bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name=b"on_cpu_clock",
            sample_freq=self.frequency,
            cpu=-1,
        )
        log.info("sampler attached: cpu-clock at %d Hz on every online CPU", self.frequency)

    def set_slot(self, slot: int) -> None:
        self._set_control(CONTROL_SLOT, slot & 1)

    def set_pid_filter(self, pid: int | None) -> None:
        self._set_control(CONTROL_PID_FILTER, pid or 0)

    def _set_control(self, index: int, value: int) -> None:
        self._control[ctypes.c_int(index)] = ctypes.c_uint32(value)

    def read_counts(self) -> list[RawCount]:
        """Every entry of the counts map (both slots)."""
        return [_raw_count(key, value) for key, value in self._counts.items()]

    def delete_counts(self, entries: Sequence[RawCount]) -> None:
        for entry in entries:
            key = self._counts.Key(
                entry.slot, entry.pid, entry.user_stack_id, entry.kernel_stack_id, entry.comm
            )
            with contextlib.suppress(KeyError):
                del self._counts[key]

    def read_stacks(self, slot: int) -> dict[int, tuple[int, ...]]:
        """Every stack of the slot's stack map: id -> addresses, innermost first."""
        table = self._stacks[slot & 1]
        stacks = {}
        for key in list(table.keys()):
            with contextlib.suppress(KeyError):
                stacks[key.value] = stack_addresses(table[key].ip)
        return stacks

    def delete_stacks(self, slot: int, stack_ids: Sequence[int]) -> None:
        _delete_keys(self._stacks[slot & 1], stack_ids)

    def read_user_stacks(self, slot: int) -> dict[int, tuple[int, ...]]:
        """The slot's user stacks: id -> addresses (the stack map itself without tables)."""
        if not self.table_unwinding:
            return self.read_stacks(slot)
        table = self._user_stacks[slot & 1]
        stacks = {}
        for key in list(table.keys()):
            with contextlib.suppress(KeyError):
                value = table[key]
                stacks[key.value] = tuple(value.ips[: min(int(value.len), len(value.ips))])
        return stacks

    def delete_user_stacks(self, slot: int, stack_ids: Sequence[int]) -> None:
        _delete_keys(self._user_stacks[slot & 1], stack_ids)

    def read_unwind_stats(self) -> tuple[int, ...]:
        """Cumulative walker counters (summed over CPUs), in UNWIND_STATS order."""
        if not self.table_unwinding:
            return (0,) * len(UNWIND_STATS)
        stats = self._bpf[b"unwind_stats"]
        return tuple(int(stats.sum(i).value) for i in range(len(UNWIND_STATS)))

    def write_unwind_rows(self, first_row: int, packed_rows: bytes) -> None:
        """Write packed rows (8 bytes each) at first_row of the global rows array."""
        rows = self._bpf[b"unwind_rows"]
        size = ctypes.sizeof(rows.Leaf)
        count = len(packed_rows) // size
        if count * size != len(packed_rows) or first_row + count > self.unwind_rows_capacity:
            raise ValueError(f"{count} rows at {first_row} do not fit the rows array")
        for done in range(0, count, ROW_WRITE_BATCH):
            n = min(ROW_WRITE_BATCH, count - done)
            keys = (rows.Key * n)(*range(first_row + done, first_row + done + n))
            chunk = packed_rows[done * size : (done + n) * size]
            rows.items_update_batch(keys, (rows.Leaf * n).from_buffer_copy(chunk))

    def add_unwind_mappings(
        self, pid: int, prefixes: Sequence[Prefix], target: MappingTarget
    ) -> None:
        table = self._bpf[b"unwind_mappings"]
        value = table.Leaf(target.bias, target.first_row, target.row_count)
        for prefix in prefixes:
            table[_mapping_key(table, pid, prefix)] = value

    def remove_unwind_mappings(self, pid: int, prefixes: Sequence[Prefix]) -> None:
        table = self._bpf[b"unwind_mappings"]
        for prefix in prefixes:
            with contextlib.suppress(KeyError):
                del table[_mapping_key(table, pid, prefix)]

    def read_lost(self) -> tuple[int, ...]:
        """Cumulative loss counters (summed over CPUs), in LOST_REASONS order."""
        return tuple(int(self._lost.sum(i).value) for i in range(len(LOST_REASONS)))

    def poll_pid_events(self, timeout_ms: int = 0) -> list[PidEvent]:
        """Pid events since the last call; waits up to timeout_ms for the first one."""
        if not self._ring_open or self._closed:
            return []
        if timeout_ms > 0:
            self._bpf.ring_buffer_poll(timeout_ms)
        else:
            self._bpf.ring_buffer_consume()
        events, self._events = self._events, []
        return events

    def _on_pid_event(self, _ctx: Any, data: Any, _size: int) -> int:
        event = ctypes.cast(data, ctypes.POINTER(_PidEventStruct)).contents
        self._events.append(PidEvent(pid=int(event.pid), kind=int(event.kind)))
        return 0

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """Program name -> (run_time_ns, run_cnt) from fdinfo.

        The kernel counts only while kernel.bpf_stats_enabled=1; a tail-called program's
        time is included in the program that the event entered (on_cpu_clock).
        """
        stats = {}
        for name, function in self._bpf.funcs.items():
            info = _fdinfo(function.fd)
            stats[name.decode()] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
        return stats

    def map_memory(self) -> dict[str, int]:
        """Map name -> bytes the kernel charges for it (fdinfo "memlock")."""
        names = MAPS + (UNWIND_MAPS if self.table_unwinding else ())
        return {name: _fdinfo(self._bpf[name.encode()].map_fd).get("memlock", 0) for name in names}

    def close(self) -> None:
        """Detach everything and free the maps. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._bpf.cleanup()


def _fdinfo(fd: int) -> dict[str, int]:
    """The integer fields of /proc/self/fdinfo/FD (0 when unreadable)."""
    fields = {}
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                name, _, value = line.partition(":")
                with contextlib.suppress(ValueError):
                    fields[name.strip()] = int(value.strip())
    except OSError:
        pass
    return fields


def _delete_keys(table: Any, ids: Sequence[int]) -> None:
    for stack_id in ids:
        with contextlib.suppress(KeyError):
            del table[table.Key(stack_id)]


def _mapping_key(table: Any, pid: int, prefix: Prefix) -> Any:
    """struct mapping_key: pid and address big-endian, so the trie matches high bits first."""
    return table.Key(32 + prefix.bits, swap_bytes(pid, 4), swap_bytes(prefix.address, 8))


def _raw_count(key: Any, value: Any) -> RawCount:
    return RawCount(
        slot=int(key.slot),
        pid=int(key.pid),
        user_stack_id=int(key.user_stack_id),
        kernel_stack_id=int(key.kernel_stack_id),
        comm=bytes(key.comm),
        count=int(value.count),
        tid=int(value.tid),
    )
