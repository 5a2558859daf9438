"""Row allocation, address routes, and tables shared and freed across real processes.

The BPF maps are replaced by `MemoryMaps`, which stores rows and routes and answers a
lookup the way bpf/profile.bpf.c does (longest prefix, bias, binary search), so the
whole address -> row path is checked against the binaries' own tables. No root needed.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import given
from hypothesis import strategies as st

from agent.elf.reader import ElfInfo, runtime_to_elf_vaddr
from agent.model import Mapping, ProcessInfo
from agent.process.reader import read_process
from agent.unwind import registry
from agent.unwind.allocator import RowAllocator
from agent.unwind.mappings import MappingTarget, Prefix, address_prefixes
from agent.unwind.registry import UnwindTables, resolve_binary
from agent.unwind.table import ROW_FORMAT, ROW_SIZE, CfaKind, UnwindTable, read_unwind_table
from agent.unwind.worker import UnwindWorker

SLEEP = "/bin/sleep"


class MemoryMaps:
    """The unwind maps of the BPF program, in memory, with the program's lookup."""

    def __init__(self, capacity: int) -> None:
        self.unwind_rows_capacity = capacity
        self.rows = bytearray(capacity * ROW_SIZE)
        self.rows_written = 0
        self.routes: dict[tuple[int, Prefix], MappingTarget] = {}

    def write_unwind_rows(self, first_row: int, packed_rows: bytes) -> None:
        self.rows[first_row * ROW_SIZE : first_row * ROW_SIZE + len(packed_rows)] = packed_rows
        self.rows_written += len(packed_rows) // ROW_SIZE

    def add_unwind_mappings(
        self, pid: int, prefixes: Sequence[Prefix], target: MappingTarget
    ) -> None:
        for prefix in prefixes:
            self.routes[(pid, prefix)] = target

    def remove_unwind_mappings(self, pid: int, prefixes: Sequence[Prefix]) -> None:
        for prefix in prefixes:
            self.routes.pop((pid, prefix), None)

    def lookup(self, pid: int, address: int) -> tuple[CfaKind, int, int] | None:
        """The rule the BPF walker would use at `address` of `pid`."""
        matches = [
            (prefix.bits, target)
            for (route_pid, prefix), target in self.routes.items()
            if route_pid == pid and (address ^ prefix.address) >> (64 - prefix.bits) == 0
        ]
        if not matches:
            return None
        target = max(matches, key=lambda match: match[0])[1]
        pc = (address - target.bias) % (1 << 64)
        rows = [
            ROW_FORMAT.unpack_from(self.rows, (target.first_row + i) * ROW_SIZE)
            for i in range(target.row_count)
        ]
        index = bisect.bisect_right([row[0] for row in rows], pc) - 1
        if index < 0:
            return None
        _, kind, rbp_slots, cfa_offset = rows[index]
        return (CfaKind(kind), cfa_offset, rbp_slots * 8)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def start_sleeper(sleepers: list[subprocess.Popen[bytes]]) -> ProcessInfo:
    proc = subprocess.Popen([SLEEP, "60"])
    sleepers.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until the exec is done and libc is mapped
        info = read_process(proc.pid)
        if info and any("libc" in m.path for m in info.mappings):
            return info
        time.sleep(0.01)
    raise AssertionError("sleep did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def libc_of(info: ProcessInfo) -> Mapping:
    return next(m for m in info.mappings if "libc.so" in m.path)


# --- allocator ------------------------------------------------------------------------


def test_allocator_first_fit_exhaustion_and_coalescing() -> None:
    rows = RowAllocator(100)
    a, b, c = 0, 30, 60
    assert [rows.allocate(30) for _ in range(3)] == [a, b, c]
    assert rows.allocate(11) is None  # only 10 left
    assert rows.used == 90 and rows.largest_free == 10
    assert rows.free(b) == 30
    assert rows.allocate(20) == 30  # first fit: the hole left by b
    assert rows.free_ranges() == [(50, 10), (90, 10)]
    rows.free(a)
    rows.free(30)
    assert rows.free_ranges() == [(0, 60), (90, 10)]  # merged with the neighbour after
    rows.free(c)
    assert rows.free_ranges() == [(0, 100)]  # merged on both sides
    assert rows.used == 0
    with pytest.raises(KeyError):
        rows.free(c)
    with pytest.raises(ValueError):
        rows.allocate(0)


def test_allocator_survives_churn_without_losing_rows() -> None:
    rows = RowAllocator(1000)
    live: dict[int, int] = {}
    for step in range(400):
        size = 1 + (step * 37) % 90
        start = rows.allocate(size)
        if start is not None:
            live[start] = size
        if step % 3 == 0 and live:
            victim = sorted(live)[step % len(live)]
            assert rows.free(victim) == live.pop(victim)
        assert rows.used == sum(live.values())
        spans = sorted((s, s + n) for s, n in [*live.items(), *rows.free_ranges()])
        assert spans[0][0] == 0 and spans[-1][1] == 1000  # used + free tile the array
        assert all(x[1] == y[0] for x, y in zip(spans, spans[1:], strict=False))


# --- address prefixes -----------------------------------------------------------------


@given(st.integers(0, (1 << 47) - 1), st.integers(1, 1 << 32))
def test_prefixes_tile_the_range_exactly(start: int, size: int) -> None:
    prefixes = address_prefixes(start, start + size)
    assert len(prefixes) <= 2 * 64
    position = start
    for prefix in prefixes:
        block = 1 << (64 - prefix.bits)
        assert prefix.address == position
        assert prefix.address % block == 0  # aligned to its own size
        position += block
    assert position == start + size


def test_page_aligned_mapping_needs_few_prefixes() -> None:
    prefixes = address_prefixes(0x7F0000001000, 0x7F0000159000)
    assert len(prefixes) <= 16
    assert prefixes[0] == Prefix(0x7F0000001000, 52)
    with pytest.raises(ValueError):
        address_prefixes(0x2000, 0x1000)


# --- registry on real processes -------------------------------------------------------


@functools.lru_cache(maxsize=8)
def table_of(path: str) -> UnwindTable:
    with open(path, "rb") as f:
        return read_unwind_table(f)


def expected_rule(info: ProcessInfo, address: int) -> tuple[CfaKind, int, int] | None:
    """The row of the binary's own table at the address's ELF virtual address."""
    mapping = next(m for m in info.mappings if m.contains(address))
    vaddr = runtime_to_elf_vaddr(address, mapping, table_of(mapping.path).loads)
    assert vaddr is not None
    row = table_of(mapping.path).row_for(vaddr)
    return row.rule() if row else None


def function_addresses(info: ProcessInfo, mapping: Mapping, names: set[str]) -> list[int]:
    elf = ElfInfo.read(mapping.path)
    load = next(s for s in elf.loads if s.flags & 1)
    with open(mapping.path, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        assert isinstance(dynsym, SymbolTableSection)
        symbols = dynsym.iter_symbols()
        vaddrs = [s["st_value"] for s in symbols if s.name in names and s["st_value"]]
    # Executable PT_LOAD: runtime = vaddr - p_vaddr + p_offset - mapping.offset + start
    return [v - load.vaddr + load.offset - mapping.offset + mapping.start for v in vaddrs]


def test_addresses_route_to_the_rows_of_their_binary(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    info = start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    tables = UnwindTables(maps)
    assert tables.prepare(info) >= 3  # sleep, libc, ld.so (and the vDSO)
    libc = libc_of(info)
    addresses = function_addresses(info, libc, {"malloc", "free", "memcpy", "qsort", "printf"})
    assert len(addresses) >= 4
    for address in addresses:
        for offset in (0, 1, 7, 40):  # a function's entry and a few bytes into its body
            want = expected_rule(info, address + offset)
            assert maps.lookup(info.pid, address + offset) == want
    assert maps.lookup(info.pid + 1_000_000, addresses[0]) is None  # another pid: no route


def test_tables_are_shared_by_build_id_and_freed_with_their_last_process(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    first, second = start_sleeper(sleepers), start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    now = [0.0]
    tables = UnwindTables(maps, idle_seconds=60, clock=lambda: now[0])
    tables.prepare(first)
    written_once = maps.rows_written
    tables.prepare(second)
    assert maps.rows_written == written_once  # same binaries: no row written twice
    stats = tables.stats()
    assert stats.processes == 2 and stats.rows_used == written_once
    libc = resolve_binary(first.pid, libc_of(first))
    assert libc is not None and libc.key.startswith("buildid:")
    assert tables.table_users(libc.key) == {first.pid, second.pid}

    stop(sleepers[0])
    assert tables.sweep() == 1
    assert tables.table_users(libc.key) == {second.pid}
    assert all(pid == second.pid for pid, _ in maps.routes)
    assert tables.stats().rows_used == written_once  # still used by the second

    stop(sleepers[1])
    assert tables.sweep() == 1
    assert maps.routes == {}
    idle = tables.stats()  # unused, kept loaded for a while in case they are run again
    assert idle.processes == 0 and idle.idle_tables == idle.tables > 0
    assert idle.rows_used == written_once
    assert tables.table_users(libc.key) == set()

    now[0] += 59
    tables.sweep()
    assert tables.stats().idle_tables == idle.idle_tables  # not yet
    now[0] += 2
    tables.sweep()
    assert tables.stats() == dataclasses.replace(
        tables.stats(), tables=0, rows_used=0, processes=0, idle_tables=0
    )


def test_idle_tables_are_reused_without_parsing_and_make_room_when_needed(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    first = start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    tables = UnwindTables(maps)  # default: idle tables kept for a minute
    loaded = tables.prepare(first)
    written = maps.rows_written
    tables.forget(first.pid)
    assert tables.stats().idle_tables == tables.stats().tables > 0
    second = start_sleeper(sleepers)  # the same binaries, run again
    assert tables.prepare(second) == loaded
    assert maps.rows_written == written  # reused: nothing parsed or written again
    assert tables.stats().idle_tables == 0

    # Rows are short: a binary that needs an idle table's rows evicts it, not refused.
    libc_mapping = libc_of(first)
    sleep_only = dataclasses.replace(
        first, mappings=tuple(m for m in first.mappings if m.path == first.exe)
    )
    assert len(table_of(first.exe)) > 10
    small = UnwindTables(MemoryMaps(len(table_of(libc_mapping.path)) + 10))
    assert small.prepare(sleep_only) == 1
    small.forget(first.pid)
    assert small.stats().idle_tables == 1
    assert small.prepare(dataclasses.replace(first, mappings=(libc_mapping,))) == 1
    stats = small.stats()
    assert stats.failed_binaries == 0 and stats.idle_tables == 0 and stats.tables == 1


def test_new_process_under_the_same_pid_replaces_routes(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    info = start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    tables = UnwindTables(maps, idle_seconds=0)  # freed at once
    tables.prepare(info)
    routed = set(maps.routes)
    only_libc = dataclasses.replace(info, mappings=(libc_of(info),))
    assert tables.prepare(only_libc) == 1  # same process after an exec: fewer mappings
    assert set(maps.routes) < routed
    assert tables.stats().tables == 1  # the others were freed
    reused = dataclasses.replace(info, start_time=info.start_time + 1, mappings=())
    assert tables.prepare(reused) == 0  # a new process under the pid
    assert maps.routes == {} and tables.stats().tables == 0


def test_binaries_that_do_not_fit_are_refused_and_retried_when_room_is_made(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    info = start_sleeper(sleepers)
    libc_mapping = libc_of(info)
    libc_rows = len(table_of(libc_mapping.path))
    maps = MemoryMaps(libc_rows + 10)
    tables = UnwindTables(maps)
    sleep_only = dataclasses.replace(
        info, mappings=tuple(m for m in info.mappings if m.path == info.exe)
    )
    assert tables.prepare(sleep_only) == 1
    assert tables.prepare(dataclasses.replace(info, mappings=(libc_mapping,))) == 0
    assert tables.stats().failed_binaries == 1
    # libc keeps no frame pointers: a walk that reaches it ends there instead of guessing.
    libc_prefixes = address_prefixes(libc_mapping.start, libc_mapping.end)
    stop = MappingTarget.without_table(frame_pointers=False)
    assert {maps.routes[(info.pid, prefix)] for prefix in libc_prefixes} == {stop}
    tables.forget(info.pid)  # sleep's rows are freed: libc fits now
    assert tables.prepare(dataclasses.replace(info, mappings=(libc_mapping,))) == 1


def test_unreadable_and_non_elf_mappings_get_frame_pointers(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    text = tmp_path / "script.txt"
    text.write_text("not an ELF file\n" * 100)
    st_text = text.stat()
    dev = f"{os.major(st_text.st_dev):02x}:{os.minor(st_text.st_dev):02x}"
    mappings = (
        Mapping(0x10000, 0x11000, 0, str(text), dev, st_text.st_ino),
        Mapping(0x20000, 0x21000, 0, "/nonexistent/lib.so", "00:00", 1),
        Mapping(0x30000, 0x31000, 0, "", "00:00", 0),  # anonymous (JIT)
    )
    odd = dataclasses.replace(start_sleeper(sleepers), mappings=mappings)
    maps = MemoryMaps(1000)
    tables = UnwindTables(maps)
    assert tables.prepare(odd) == 0
    # Routed all the same: the walker guesses only where a route says so.
    frame_pointers = MappingTarget.without_table(frame_pointers=True)
    assert set(maps.routes.values()) == {frame_pointers} and len(maps.routes) == 3
    assert tables.stats().tables == 0
    assert tables.stats().failed_binaries == 1  # the text file was opened, then refused
    assert tables.prepare(odd) == 0  # and not read again


def test_the_agent_itself_gets_no_tables_and_no_guesses() -> None:
    own = read_process(os.getpid())
    assert own is not None and own.mappings
    maps = MemoryMaps(1_000_000)
    tables = UnwindTables(maps)
    assert tables.prepare(own) == 0
    assert tables.stats().tables == 0 and tables.stats().rows_used == 0
    assert set(maps.routes.values()) == {MappingTarget.without_table(frame_pointers=False)}


def test_vdso_gets_a_table(sleepers: list[subprocess.Popen[bytes]]) -> None:
    info = start_sleeper(sleepers)
    vdso = [m for m in info.mappings if m.path == "[vdso]"]
    if not vdso:
        pytest.skip("no vDSO mapped")
    source = resolve_binary(info.pid, vdso[0])
    assert source is not None and source.key.startswith("vdso:")
    with source.open() as stream:
        table: UnwindTable = read_unwind_table(stream)
    assert len(table) > 3
    maps = MemoryMaps(10_000)
    tables = UnwindTables(maps)
    assert tables.prepare(dataclasses.replace(info, mappings=tuple(vdso))) == 1


def test_a_binary_mapped_before_is_keyed_without_a_look_at_its_file_and_found_when_needed(
    sleepers: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under churn every new process maps the same few binaries: it is routed by their
    maps identity, without a stat or an open. A table freed since is parsed again from
    the file, found then through the process that maps it now."""
    first = start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    tables = UnwindTables(maps, idle_seconds=0)  # a table is freed with its last process
    with_tables = tables.prepare(first)
    assert with_tables >= 3  # sleep, libc, ld.so (and the vDSO)
    second = start_sleeper(sleepers)

    def looked_at(pid: int, mapping: Mapping, proc: Path = Path("/proc")) -> None:
        raise AssertionError(f"looked at {mapping.path}, known already")

    with monkeypatch.context() as patched:
        patched.setattr(registry, "open_mapped_file", looked_at)
        assert tables.prepare(second) == with_tables
    libc = resolve_binary(first.pid, libc_of(first))
    assert libc is not None and tables.table_users(libc.key) == {first.pid, second.pid}
    stop(sleepers[0])
    stop(sleepers[1])
    tables.sweep()
    assert tables.stats().rows_used == 0 and maps.routes == {}
    third = start_sleeper(sleepers)
    assert tables.prepare(third) == with_tables  # parsed again, files opened through it
    assert tables.table_users(libc.key) == {third.pid} and tables.stats().rows_used > 0


def test_worker_prepares_in_the_background_and_sweeps_exited_processes(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    info = start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    worker = UnwindWorker(UnwindTables(maps, idle_seconds=0), sweep_seconds=0.05)
    worker.start()
    try:
        worker.submit_pid(info.pid)
        assert worker.wait_idle(timeout=60)
        assert worker.tables.stats().processes == 1 and maps.routes
        stop(sleepers[0])
        deadline = time.monotonic() + 30
        while maps.routes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert maps.routes == {} and worker.tables.stats().rows_used == 0
    finally:
        worker.close()


def test_closing_the_worker_is_prompt_and_writes_nothing_after(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    """A table still being built at shutdown (seconds for a big binary) neither holds
    the exit nor writes into maps that are closing (it used to: EBADF tracebacks)."""
    info = start_sleeper(sleepers)
    maps = MemoryMaps(1_000_000)
    reading, release = threading.Event(), threading.Event()

    def slow_read(pid: int) -> ProcessInfo | None:
        reading.set()
        release.wait(timeout=60)  # as a big parse would: it ends after the close
        return info

    worker = UnwindWorker(UnwindTables(maps), read=slow_read)
    worker.start()
    worker.submit_pid(info.pid)
    assert reading.wait(timeout=10)
    started = time.monotonic()
    worker.close()
    assert time.monotonic() - started < 1.5
    release.set()
    assert worker.wait_idle(timeout=30)  # the read returned, the prepare ran on closed tables
    assert maps.routes == {} and worker.tables.stats().processes == 0


def test_a_capture_handed_to_the_worker_is_routed_as_captured_without_reading_proc(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    """The pipeline's capture is what the worker routes: /proc is read once per new
    process. A newer capture of a pid still queued (an exec, a dlopen) replaces it."""
    info = start_sleeper(sleepers)
    older = dataclasses.replace(info, mappings=(libc_of(info),))
    busy, release = threading.Event(), threading.Event()
    reads: list[int] = []

    def read(pid: int) -> ProcessInfo | None:
        reads.append(pid)
        busy.set()
        release.wait(10)
        return None

    maps = MemoryMaps(1_000_000)
    worker = UnwindWorker(UnwindTables(maps), read=read, threads=1)
    worker.start()
    try:
        worker.submit_pid(1)  # holds the one thread while the captures queue up
        assert busy.wait(10)
        worker.submit(older)
        worker.submit(info)
        release.set()
        assert worker.wait_idle(timeout=60)
        assert reads == [1]  # only the pid that came without a capture was read
        assert worker.tables.stats().processes == 1
        libc = libc_of(info)
        assert any(m.path != libc.path for m in info.mappings)
        for mapping in info.mappings:  # the newer capture's every mapping, not just libc
            prefix = address_prefixes(mapping.start, mapping.end)[0]
            assert (info.pid, prefix) in maps.routes, mapping
    finally:
        worker.close()


def test_new_code_is_prepared_before_the_start_up_backlog() -> None:
    """At start every running process is first seen at once; a process that execs then
    must not wait behind them all (its first window would be cut)."""
    order: list[int] = []
    first_taken, release = threading.Event(), threading.Event()

    def read(pid: int) -> ProcessInfo | None:
        order.append(pid)
        first_taken.set()
        release.wait(10)
        return None  # "exited": nothing to route

    worker = UnwindWorker(UnwindTables(MemoryMaps(1000)), read=read, threads=1)
    worker.start()
    try:
        worker.submit_pid(100, urgent=False)
        assert first_taken.wait(10)  # the thread is busy with 100
        for pid in (101, 102, 103):
            worker.submit_pid(pid, urgent=False)
        worker.submit_pid(200, urgent=True)  # an exec
        worker.submit_pid(102, urgent=True)  # a backlog pid that now runs new code
        release.set()
        assert worker.wait_idle(timeout=10)
        assert order == [100, 200, 102, 101, 103]  # 102 once: its backlog entry went stale
    finally:
        worker.close()
