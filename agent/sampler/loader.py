"""Compile and load bpf/profile.bpf.c, then drive it with plain bpf() syscalls.

bcc compiles with LLVM in whatever process calls it: ~150 MB of RSS that would stay
for the agent's whole life. So the compile runs in a short-lived child
(`compile_parent.compile_in_child`): it loads the programs, hands back the fds of every
map and program, and exits. This process never imports bcc; it attaches with
perf_event_open/raw tracepoints and reads the maps through `BpfMap`/`RingBuffer`.

`load_sampler_program` returns a `SamplerProgram`: a narrow handle (attach, set the
slot and pid filter, read/delete map entries as plain values, poll pid events,
close). The struct layouts below mirror bpf/profile.bpf.c and are checked against the
kernel's key/value sizes at load.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from agent.sampler import bpf_syscalls
from agent.sampler.bpf_map import BpfMap
from agent.sampler.compile_parent import CompiledProgram
from agent.sampler.convert import (
    LOST_REASONS,
    OFF_CPU_STATS,
    UNWIND_STATS,
    PidEvent,
    RawCount,
    RawOffCpu,
    stack_addresses,
)
from agent.sampler.kernel_headers import HeaderChoice, default_cache_dir, find_kernel_headers
from agent.sampler.program_cache import compile_or_load
from agent.sampler.ringbuf import RingBuffer
from agent.unwind.mappings import MappingTarget, Prefix

log = logging.getLogger(__name__)

_REPO_BPF = Path(__file__).resolve().parents[2] / "bpf" / "profile.bpf.c"
_PACKAGED_BPF = Path(__file__).resolve().parents[1] / "bpf" / "profile.bpf.c"

CONTROL_SLOT = 0  # enum control_index in the BPF program
CONTROL_PID_FILTER = 1
CONTROL_OFFCPU_MIN_US = 2
CONTROL_OFFCPU_MAX_PER_PERIOD = 3
OFF_CPU_PERIODS_PER_SECOND = 10  # OFFCPU_PERIOD_NS in the BPF program: 100 ms
DEFAULT_COUNTS_ENTRIES = 65536  # 56 bytes a key+value: 3.5 MiB, room for 20k+ stacks
DEFAULT_STACK_ENTRIES = 16384  # per slot; a stack-map entry is ~1 KiB (127 frames)
USER_STACK_ENTRIES = 65536  # per slot, table-walked stacks; allocated on use, 1 KiB each
SEEN_ENTRIES = 65536
EVENT_PAGES = 64  # ring buffer of 256 KiB: ~16k pid events between polls
DEFAULT_UNWIND_ROWS = 2_000_000  # 8 bytes each: 16 MB of unwind table rows
DEFAULT_UNWIND_MAPPINGS = 262_144  # LPM trie entries (pid, address prefix); allocated on use
OFF_CPU_THREADS = 16_384  # threads blocked at once that can be tracked (LRU, 64 B each)
# Distinct stacks of blocked threads (LRU, preallocated: ~1.5 KiB user + 1 KiB kernel each)
OFF_CPU_STACKS = 2_048
ROW_WRITE_BATCH = 65_536
COMPILE_TIMEOUT_SECONDS = 120.0
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
TRACEPOINTS = {"sched_process_exec": "on_exec", "sched_process_exit": "on_exit"}
OFF_CPU_TRACEPOINT = ("sched_switch", "on_sched_switch")

# Layouts of bpf/profile.bpf.c (native byte order; "x" is the compiler's padding).
SAMPLE_KEY = struct.Struct("=IIqi16s4x")  # slot, pid, user_stack_id, kernel_stack_id, comm
SAMPLE_VALUE = struct.Struct("=QI4x")  # count, tid
PID_EVENT = struct.Struct("=IIQ")  # pid, kind, address
OFF_CPU_KEY = struct.Struct("=IIqq16s")  # slot, pid, user_stack_id, kernel_stack_id, comm
OFF_CPU_VALUE = struct.Struct("=QQI4x")  # count, ns, tid
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
MAPPING_VALUE = struct.Struct("=QII")  # bias, first_row, row_count
UNWIND_ROW_SIZE = 8


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
    cache_dir: Path | None = None,
    python_frames: bool = False,
    off_cpu: bool = False,
) -> SamplerProgram:
    """Compile and load the sampler in a child process (not attached yet: `attach()`).

    unwind_rows > 0 builds the table-driven user stack walker with that many rows and
    has the verifier pass it; 0 keeps frame-pointer user stacks only. Raises
    KernelHeadersError when no headers are usable, BpfCompileError when the compiler
    or the kernel refuses the program. The compiled program is kept under
    cache_dir/bpf (default_cache_dir() when None): a later start loads it with no compile.
    python_frames (with unwind_rows > 0) adds the CPython frame walker; off_cpu the
    sched_switch program that records blocked time (with the same walkers).
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
    programs = {
        "on_cpu_clock": "perf_event",
        "on_exec": "raw_tracepoint",
        "on_exit": "raw_tracepoint",
    }
    tail_calls: dict[str, dict[int, str]] = {}
    if unwind_rows > 0:
        cflags += [
            "-DDWARF_UNWIND",
            f"-DUNWIND_ROWS={unwind_rows}",
            f"-DUNWIND_MAPPINGS={DEFAULT_UNWIND_MAPPINGS}",
            f"-DUSER_STACK_ENTRIES={max(USER_STACK_ENTRIES, stack_entries)}",
        ]
        programs["unwind_user"] = "perf_event"  # tail-called from on_cpu_clock
        tail_calls["unwind_programs"] = {0: "unwind_user"}
        if python_frames:
            cflags.append("-DPYTHON_FRAMES")
            programs["unwind_python"] = "perf_event"
            tail_calls["unwind_programs"][1] = "unwind_python"
    if off_cpu:
        cflags += [
            "-DOFF_CPU",
            f"-DOFFCPU_THREADS={OFF_CPU_THREADS}",
            f"-DOFFCPU_STACKS={OFF_CPU_STACKS}",
        ]
        if kernel_at_least(os.uname().release, (5, 18)):  # sched_switch got prev_state
            cflags.append("-DSCHED_SWITCH_PREV_STATE")
        programs["on_sched_switch"] = "raw_tracepoint"
        if unwind_rows > 0:  # the walkers again, as raw-tracepoint programs
            programs["off_cpu_unwind_user"] = "raw_tracepoint"
            tail_calls["off_cpu_programs"] = {0: "off_cpu_unwind_user"}
            if python_frames:
                programs["off_cpu_unwind_python"] = "raw_tracepoint"
                tail_calls["off_cpu_programs"][1] = "off_cpu_unwind_python"
    compiled = compile_or_load(
        bpf_source_path().read_text(),
        cflags,
        programs,
        tail_calls,
        headers,
        (cache_dir or default_cache_dir()) / "bpf",
        COMPILE_TIMEOUT_SECONDS,
    )
    try:
        program = SamplerProgram(compiled, frequency, unwind_rows)
        program.set_pid_filter(pid_filter)
    except BaseException:
        compiled.close()
        raise
    return program


class SamplerProgram:
    """The loaded BPF sampler: maps as plain values, attach/detach, pid events."""

    def __init__(self, compiled: CompiledProgram, frequency: int, unwind_rows: int = 0):
        self._compiled = compiled
        self.frequency = frequency
        self.unwind_rows_capacity = unwind_rows  # 0: frame pointers only
        self._counts = _checked(compiled.map("counts"), SAMPLE_KEY.size, SAMPLE_VALUE.size)
        self.counts_capacity = self._counts.max_entries
        self._stacks = (compiled.map("stacks0"), compiled.map("stacks1"))
        self.stacks_capacity = self._stacks[0].max_entries
        self._user_stacks = (
            (compiled.map("user_stacks0"), compiled.map("user_stacks1"))
            if unwind_rows
            else self._stacks
        )
        self.user_stacks_capacity = self._user_stacks[0].max_entries
        # Looked up once: a per-CPU BpfMap reads the CPU count from /sys when made.
        self._unwind_stats = compiled.map("unwind_stats") if unwind_rows else None
        self._py_procs = compiled.map("py_procs") if "py_procs" in compiled.maps else None
        self._control = _checked(compiled.map("control"), U32.size, U32.size)
        self.off_cpu = "off_cpu_counts" in compiled.maps
        if self.off_cpu:
            _checked(compiled.map("off_cpu_counts"), OFF_CPU_KEY.size, OFF_CPU_VALUE.size)
            self._off_cpu_stats = compiled.map("off_cpu_stats")
        self._lost = _checked(compiled.map("lost"), U32.size, U64.size)
        self._ring: RingBuffer | None = None
        self._attachments: list[int] = []  # perf event and raw tracepoint fds
        self._closed = False

    @property
    def table_unwinding(self) -> bool:
        return self.unwind_rows_capacity > 0

    def attach(self) -> None:
        """Start sampling every online CPU and watching exec/exit. Call once."""
        programs = self._compiled.programs
        self._ring = self._compiled.ring_buffer("pid_events")
        # Raw tracepoints: unlike tracepoints they need no mounted tracefs.
        tracepoints = dict(TRACEPOINTS)
        if self.off_cpu:
            tracepoints[OFF_CPU_TRACEPOINT[0]] = OFF_CPU_TRACEPOINT[1]
        for tracepoint, function in tracepoints.items():
            fd = bpf_syscalls.raw_tracepoint_open(tracepoint, programs[function])
            self._attachments.append(fd)
        for cpu in bpf_syscalls.online_cpus():
            fd = bpf_syscalls.open_cpu_clock_event(cpu, self.frequency)
            self._attachments.append(fd)
            bpf_syscalls.attach_perf_event(fd, programs["on_cpu_clock"])
        log.info("sampler attached: cpu-clock at %d Hz on every online CPU", self.frequency)

    def set_slot(self, slot: int) -> None:
        self._set_control(CONTROL_SLOT, slot & 1)

    def set_pid_filter(self, pid: int | None) -> None:
        self._set_control(CONTROL_PID_FILTER, pid or 0)

    def set_off_cpu(self, min_block_us: int, max_rate: int) -> None:
        """Count blocked intervals of at least min_block_us; walk at most max_rate blocking
        switches per second per CPU (0: all). Read per event: settable at any time."""
        self._set_control(CONTROL_OFFCPU_MIN_US, min_block_us)
        per_period = -(-max_rate // OFF_CPU_PERIODS_PER_SECOND) if max_rate > 0 else 0
        self._set_control(CONTROL_OFFCPU_MAX_PER_PERIOD, per_period)

    def read_off_cpu_counts(self) -> list[RawOffCpu]:
        """Every entry of the off-CPU counts map (both slots)."""
        table = self._compiled.map("off_cpu_counts")
        key_of, value_of = OFF_CPU_KEY.unpack, OFF_CPU_VALUE.unpack
        return [RawOffCpu(*key_of(k), *value_of(v)) for k, v in table.lookup_batch()]

    def delete_off_cpu_counts(self, entries: Sequence[RawOffCpu]) -> None:
        self._compiled.map("off_cpu_counts").delete_batch(
            OFF_CPU_KEY.pack(e.slot, e.pid, e.user_stack_id, e.kernel_stack_id, e.comm)
            for e in entries
        )

    def read_off_cpu_stacks(
        self, user_ids: Iterable[int], kernel_ids: Iterable[int]
    ) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        """The off-CPU stacks of these ids (user, kernel); an id the LRU evicted is absent."""
        user_table = self._compiled.map("off_cpu_user_stacks")
        kernel_table = self._compiled.map("off_cpu_kernel_stacks")
        user, kernel = {}, {}
        for stack_id in user_ids:
            value = user_table.lookup(U64.pack(stack_id))
            if value is not None:
                length = min(U64.unpack_from(value)[0], len(value) // 8 - 1)
                user[stack_id] = _words(length).unpack_from(value, 8)
        for stack_id in kernel_ids:
            value = kernel_table.lookup(U64.pack(stack_id))
            if value is not None:
                kernel[stack_id] = stack_addresses(_words(len(value) // 8).unpack(value))
        return user, kernel

    def read_off_cpu_stats(self) -> tuple[int, ...]:
        """Cumulative off-CPU counters (summed over CPUs), in OFF_CPU_STATS order."""
        if not self.off_cpu:
            return (0,) * len(OFF_CPU_STATS)
        return _percpu_sums(self._off_cpu_stats, len(OFF_CPU_STATS))

    def _set_control(self, index: int, value: int) -> None:
        self._control.update(U32.pack(index), U32.pack(value))

    def read_counts(self) -> list[RawCount]:
        """Every entry of the counts map (both slots), in few syscalls."""
        key_of, value_of = SAMPLE_KEY.unpack, SAMPLE_VALUE.unpack
        return [RawCount(*key_of(k), *value_of(v)) for k, v in self._counts.lookup_batch()]

    def delete_counts(self, entries: Sequence[RawCount]) -> None:
        self._counts.delete_batch(
            SAMPLE_KEY.pack(e.slot, e.pid, e.user_stack_id, e.kernel_stack_id, e.comm)
            for e in entries
        )

    def read_stacks(self, slot: int) -> dict[int, tuple[int, ...]]:
        """Every stack of the slot's stack map: id -> addresses, innermost first."""
        stacks = {}
        for key, value in self._stacks[slot & 1].items():
            ips = struct.unpack(f"={len(value) // 8}Q", value)
            stacks[U32.unpack(key)[0]] = stack_addresses(ips)
        return stacks

    def delete_stacks(self, slot: int, stack_ids: Sequence[int]) -> None:
        self._stacks[slot & 1].delete_batch(U32.pack(i) for i in stack_ids)

    def read_user_stacks(self, slot: int) -> dict[int, tuple[int, ...]]:
        """The slot's user stacks: id -> addresses (the stack map itself without tables)."""
        if not self.table_unwinding:
            return self.read_stacks(slot)
        stacks = {}
        for key, value in self._user_stacks[slot & 1].lookup_batch():
            # Unpack only the walked words (~50 of 127): a window has ~20,000 such stacks.
            length = min(U64.unpack_from(value)[0], len(value) // 8 - 1)
            stacks[U64.unpack(key)[0]] = _words(length).unpack_from(value, 8)
        return stacks

    def delete_user_stacks(self, slot: int, stack_ids: Sequence[int]) -> None:
        self._user_stacks[slot & 1].delete_batch(U64.pack(i) for i in stack_ids)

    def read_unwind_stats(self) -> tuple[int, ...]:
        """Cumulative walker counters (summed over CPUs), in UNWIND_STATS order."""
        if self._unwind_stats is None:
            return (0,) * len(UNWIND_STATS)
        return _percpu_sums(self._unwind_stats, len(UNWIND_STATS))

    def write_unwind_rows(self, first_row: int, packed_rows: bytes) -> None:
        """Write packed rows (8 bytes each) at first_row of the global rows array."""
        rows = self._compiled.map("unwind_rows")
        count = len(packed_rows) // UNWIND_ROW_SIZE
        if count * UNWIND_ROW_SIZE != len(packed_rows) or first_row + count > rows.max_entries:
            raise ValueError(f"{count} rows at {first_row} do not fit the rows array")
        for done in range(0, count, ROW_WRITE_BATCH):
            n = min(ROW_WRITE_BATCH, count - done)
            first = first_row + done
            keys = struct.pack(f"={n}I", *range(first, first + n))
            chunk = packed_rows[done * UNWIND_ROW_SIZE : (done + n) * UNWIND_ROW_SIZE]
            rows.update_batch(keys, chunk)

    def add_unwind_mappings(
        self, pid: int, prefixes: Sequence[Prefix], target: MappingTarget
    ) -> None:
        table = self._compiled.map("unwind_mappings")
        value = MAPPING_VALUE.pack(target.bias, target.first_row, target.row_count)
        for prefix in prefixes:
            table.update(_mapping_key(pid, prefix), value)

    def remove_unwind_mappings(self, pid: int, prefixes: Sequence[Prefix]) -> None:
        table = self._compiled.map("unwind_mappings")
        for prefix in prefixes:
            table.delete(_mapping_key(pid, prefix))

    @property
    def python_frames(self) -> bool:
        return self._py_procs is not None

    def set_python_process(self, pid: int, config: bytes) -> None:
        """Walk this process's Python frames with `config` (struct py_proc)."""
        if self._py_procs is not None and not self._closed:
            self._py_procs.update(U32.pack(pid), config)

    def remove_python_process(self, pid: int) -> None:
        if self._py_procs is not None and not self._closed:
            with contextlib.suppress(OSError, KeyError):
                self._py_procs.delete(U32.pack(pid))

    def read_lost(self) -> tuple[int, ...]:
        """Cumulative loss counters (summed over CPUs), in LOST_REASONS order."""
        return _percpu_sums(self._lost, len(LOST_REASONS))

    def poll_pid_events(self, timeout_ms: int = 0) -> list[PidEvent]:
        """Pid events since the last call; waits up to timeout_ms for the first one."""
        if self._ring is None or self._closed:
            return []
        records = self._ring.poll(timeout_ms) if timeout_ms > 0 else self._ring.consume()
        events = []
        for record in records:
            if len(record) >= PID_EVENT.size:
                pid, kind, address = PID_EVENT.unpack_from(record)
                events.append(PidEvent(pid=pid, kind=kind, address=address))
        return events

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """Program name -> (run_time_ns, run_cnt) from the kernel's program info.

        The kernel counts only while kernel.bpf_stats_enabled=1 (or an
        enable_run_time_stats fd is open); a tail-called program's time is included
        in the program that the event entered (on_cpu_clock).
        """
        stats = {}
        for name, fd in self._compiled.programs.items():
            info = bpf_syscalls.prog_info(fd)
            stats[name] = (info.run_time_ns, info.run_cnt)
        return stats

    def map_memory(self) -> dict[str, int]:
        """Map name -> bytes the kernel charges for it (fdinfo "memlock")."""
        names = MAPS + (UNWIND_MAPS if self.table_unwinding else ())
        return {name: _fdinfo(self._compiled.maps[name].fd).get("memlock", 0) for name in names}

    def close(self) -> None:
        """Detach everything and free the maps. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fd in self._attachments:  # detaching first: no sample runs on freed maps
            with contextlib.suppress(OSError):
                os.close(fd)
        self._attachments.clear()
        if self._ring is not None:
            self._ring.close()
        self._compiled.close()


def kernel_at_least(release: str, version: tuple[int, int]) -> bool:
    """Whether a kernel release string ("6.18.44-fc-v1300") is at least major.minor."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= version


def _checked(bpf_map: BpfMap, key_size: int, value_size: int) -> BpfMap:
    """The map, after checking that the kernel's sizes match our struct layouts."""
    if (bpf_map.key_size, bpf_map.value_size) != (key_size, value_size):
        raise RuntimeError(
            f"map {bpf_map.name}: key/value sizes {bpf_map.key_size}/{bpf_map.value_size} "
            f"differ from the agent's layout {key_size}/{value_size}; "
            "bpf/profile.bpf.c and agent/sampler/loader.py disagree"
        )
    return bpf_map


def _percpu_sums(array: BpfMap, count: int) -> tuple[int, ...]:
    sums = []
    for index in range(count):
        values = array.lookup_percpu(U32.pack(index)) or []
        sums.append(sum(U64.unpack(v)[0] for v in values))
    return tuple(sums)


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


def _mapping_key(pid: int, prefix: Prefix) -> bytes:
    """struct mapping_key: pid and address big-endian, so the trie matches high bits first."""
    return U32.pack(32 + prefix.bits) + struct.pack(">IQ", pid, prefix.address)


@functools.cache
def _words(count: int) -> struct.Struct:
    return struct.Struct(f"={count}Q")
