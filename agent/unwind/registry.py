"""Unwind tables shared by binary across processes, in bounded BPF memory.

    tables = UnwindTables(maps)        # maps: the loaded sampler program
    tables.prepare(process)            # build/load its binaries' tables, route its mappings
    tables.sweep()                     # forget exited processes, free unused tables

A binary is identified by its GNU build id (else dev:inode:mtime:size), so the table
of libc is built once and its rows are written once, whatever the number of processes
mapping it. A table lives in one contiguous range of the global rows array while at
least one process maps it. When its last process goes, the table stays loaded but idle
for `idle_seconds` (default 10 minutes): short-lived processes that run the same binaries
again and again (shells, cron jobs, probes) reuse it instead of parsing .eh_frame each
time, and a binary run again within minutes starts with whole stacks. Keeping it costs
nothing the host needs: the rows are preallocated, and idle tables are freed at once,
oldest first, when another table needs their rows (else by `sweep()` when time is up).

Thread-safe (one lock): a worker thread prepares and sweeps while a test or the
pipeline may prepare directly.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from agent.elf.mapped_files import VDSO, open_mapped_file, own_vdso
from agent.elf.reader import ElfInfo, ElfReadError, LoadSegment, read_build_id
from agent.model import Mapping, ProcessInfo
from agent.process.reader import PROC, read_start
from agent.unwind.allocator import RowAllocator
from agent.unwind.mappings import MappingTarget, Prefix, address_prefixes, table_bias
from agent.unwind.table import UnwindTable, UnwindTableError, read_unwind_table

log = logging.getLogger(__name__)

MAX_REMEMBERED_FAILURES = 4096
MAX_REMEMBERED_KEYS = 4096
DEFAULT_IDLE_SECONDS = 600.0
BIG_BINARY = 16 << 20  # bytes; libclang-cpp (63 MB) parses in 4 s quiet, 15 s under load
_BINARY_KEYS: dict[str, str] = {}  # file identity (dev:inode:mtime:size) -> sharing key
# A mapping's file as /proc/PID/maps names it (device, inode, path) -> its sharing key and
# size: a process of binaries seen before is routed without a stat of them.
_MAPPED_KEYS: dict[tuple[str, int, str], tuple[str, int]] = {}


class UnwindMaps(Protocol):
    """The BPF maps the tables go into (implemented by the loaded sampler program)."""

    @property
    def unwind_rows_capacity(self) -> int: ...

    def write_unwind_rows(self, first_row: int, packed_rows: bytes) -> None: ...

    def add_unwind_mappings(
        self, pid: int, prefixes: Sequence[Prefix], target: MappingTarget
    ) -> None: ...

    def remove_unwind_mappings(self, pid: int, prefixes: Sequence[Prefix]) -> None: ...


@dataclass(frozen=True)
class BinarySource:
    """A mapped file we can read: its cache key and how to open it."""

    key: str
    open: Callable[[], IO[bytes]]
    size: int = 0  # bytes of the file: a big one takes seconds to parse


@dataclass
class _LoadedTable:
    first_row: int
    row_count: int
    base: int
    loads: tuple[LoadSegment, ...]
    users: set[int] = field(default_factory=set)  # pids


@dataclass(frozen=True)
class _Refused:
    """A binary without a loaded table: rows it needs (0: it has none), and whether
    its code keeps frame pointers (the walk then goes on with them)."""

    rows_needed: int
    frame_pointers: bool


_NO_TABLE = _Refused(0, True)  # no .eh_frame at all (Go, JIT code): frame pointers


@dataclass
class _Process:
    start_time: int
    routes: dict[tuple[int, int], tuple[str, tuple[Prefix, ...]]]  # (start, end) -> key, prefixes


@dataclass(frozen=True)
class UnwindTableStats:
    tables: int
    rows_used: int
    rows_capacity: int
    processes: int
    failed_binaries: int
    routes: int  # (pid, address prefix) entries in the BPF trie
    idle_tables: int = 0  # loaded, used by no process, kept for reuse (counted in tables)
    refused_tables: int = 0  # binaries with a table that did not fit the rows


class UnwindTables:
    """Tables by binary key, routes by pid; see the module docstring."""

    def __init__(
        self,
        maps: UnwindMaps,
        *,
        proc: Path = PROC,
        resolve: Callable[[int, Mapping], BinarySource | None] | None = None,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._maps = maps
        self._proc = proc
        self._resolve = resolve or (lambda pid, mapping: resolve_binary(pid, mapping, proc))
        self._allocator = RowAllocator(maps.unwind_rows_capacity)
        self._tables: dict[str, _LoadedTable] = {}
        self._processes: dict[int, _Process] = {}
        self._failed: OrderedDict[str, _Refused] = OrderedDict()
        self._idle: OrderedDict[str, float] = OrderedDict()  # key -> idle since, oldest first
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False  # close(): the maps go away, nothing is written any more
        self._parsing: set[str] = set()  # keys a thread is parsing (outside the lock)
        self._parsing_big: set[str] = set()  # those of them at least BIG_BINARY in size
        self._own_pid = os.getpid()

    def prepare(self, process: ProcessInfo) -> int:
        """Load tables for the process's executable mappings and route its addresses.

        Replaces what was routed for this pid before (an exec, or a pid reused by a new
        process). Every executable mapping gets a route, so an address with none is
        code the walker must not guess at: with a table; else with frame pointers (no
        .eh_frame, as Go and JIT code, or a file we cannot read); else, for a refused
        table of code without frame pointers, a stop. Returns how many mappings now
        have a table. The agent's own process gets stops only (see _stop_own).
        Tables are parsed outside the lock, so stats() and other processes' routes
        never wait.
        """
        if process.pid == self._own_pid:
            return self._stop_own(process)
        sources = [(m, self._resolve(process.pid, m)) for m in process.mappings]
        claimed: set[str] = set()  # keys this call parses: others wait for them
        try:
            parsed = self._parse_missing((s for _, s in sources if s is not None), claimed)
            with self._lock:
                return self._route_all(process, sources, parsed)
        finally:
            if claimed:
                with self._lock:
                    self._parsing -= claimed
                    self._parsing_big -= claimed

    def _stop_own(self, process: ProcessInfo) -> int:
        """The agent's own stacks end at their first frame: its python3 keeps no frame
        pointers, and tables for it would take rows from the host's processes."""
        stop = MappingTarget.without_table(frame_pointers=False)
        with self._lock:
            if self._closed:
                return 0
            routes = {}
            for mapping in process.mappings:
                prefixes = address_prefixes(mapping.start, mapping.end)
                self._maps.add_unwind_mappings(process.pid, prefixes, stop)
                routes[(mapping.start, mapping.end)] = ("", prefixes)
            self._replace_routes(process.pid, self._processes.get(process.pid), routes)
            self._processes[process.pid] = _Process(process.start_time, routes)
            return 0

    def _route_all(
        self,
        process: ProcessInfo,
        sources: list[tuple[Mapping, BinarySource | None]],
        parsed: dict[str, UnwindTable | None],
    ) -> int:
        """Route the process's mappings (lock held); how many have a table."""
        if self._closed:
            return 0
        old = self._processes.get(process.pid)
        if old is not None and old.start_time != process.start_time:
            self._forget(process.pid)
            old = None
        routes: dict[tuple[int, int], tuple[str, tuple[Prefix, ...]]] = {}
        for mapping, source in sources:
            route = self._route(process.pid, mapping, source, parsed)
            if route is not None:
                routes[(mapping.start, mapping.end)] = route
        self._replace_routes(process.pid, old, routes)
        self._processes[process.pid] = _Process(process.start_time, routes)
        return sum(1 for key, _ in routes.values() if key in self._tables)

    def close(self) -> None:
        """Write nothing into the maps from now on (their program is closing)."""
        with self._lock:
            self._closed = True

    def forget(self, pid: int) -> None:
        """Drop the pid's routes; tables no process uses any more are freed."""
        with self._lock:
            if not self._closed:
                self._forget(pid)

    def sweep(self) -> int:
        """Forget processes that exited (or whose pid now names another process), and
        free tables idle for longer than idle_seconds. Returns how many were forgotten."""
        with self._lock:
            if self._closed:
                return 0
            gone = [pid for pid, entry in self._processes.items() if not self._alive(pid, entry)]
            for pid in gone:
                self._forget(pid)
            expired = self._clock() - self._idle_seconds
            while self._idle and next(iter(self._idle.values())) <= expired:
                self._free_idle()
            return len(gone)

    def stats(self) -> UnwindTableStats:
        with self._lock:
            return UnwindTableStats(
                tables=len(self._tables),
                rows_used=self._allocator.used,
                rows_capacity=self._allocator.capacity,
                processes=len(self._processes),
                failed_binaries=len(self._failed),
                idle_tables=len(self._idle),
                refused_tables=sum(1 for r in self._failed.values() if r.rows_needed),
                routes=sum(
                    len(prefixes)
                    for entry in self._processes.values()
                    for _, prefixes in entry.routes.values()
                ),
            )

    def table_users(self, key: str) -> set[int]:
        """Pids whose mappings use the table of binary `key` (empty when not loaded)."""
        with self._lock:
            table = self._tables.get(key)
            return set(table.users) if table else set()

    def _alive(self, pid: int, entry: _Process) -> bool:
        try:
            return read_start(pid, self._proc)[1] == entry.start_time
        except (OSError, ValueError):
            return False

    def _parse_missing(
        self, sources: Iterable[BinarySource], claimed: set[str]
    ) -> dict[str, UnwindTable | None]:
        """Tables of the binaries not loaded yet (None: the file has none). No lock held.

        A binary another thread is parsing is left to it: this process's mapping of it
        stays unrouted until a walk that meets it asks again (an unknown-code event).
        """
        parsed: dict[str, UnwindTable | None] = {}
        for source in sources:
            if source.key in parsed or not self._claim(source.key, source.size >= BIG_BINARY):
                continue
            claimed.add(source.key)
            try:
                with source.open() as stream:
                    parsed[source.key] = read_unwind_table(stream)
            except (OSError, UnwindTableError) as exc:
                log.debug("no unwind table for %s: %s", source.key, exc)
                parsed[source.key] = None
        return parsed

    def _claim(self, key: str, big: bool) -> bool:
        """Whether this thread should parse key now (then it is marked being parsed).

        One big binary at a time: the other thread stays free for small ones."""
        with self._lock:
            if key in self._parsing or not self._worth_parsing(key):
                return False
            if big and self._parsing_big:
                return False
            self._parsing.add(key)
            if big:
                self._parsing_big.add(key)
            return True

    def _worth_parsing(self, key: str) -> bool:
        if key in self._tables:
            return False
        refused = self._failed.get(key)
        reclaimable = sum(self._tables[idle].row_count for idle in self._idle)
        return refused is None or (
            0 < refused.rows_needed <= self._allocator.largest_free + reclaimable
        )

    def _route(
        self,
        pid: int,
        mapping: Mapping,
        source: BinarySource | None,
        parsed: dict[str, UnwindTable | None],
    ) -> tuple[str, tuple[Prefix, ...]] | None:
        target, table = self._target(mapping, source, parsed)
        if target is None:
            return None  # its table is being parsed: unrouted (the walk stops) until then
        key = source.key if source is not None and table is not None else ""
        prefixes = address_prefixes(mapping.start, mapping.end)
        try:
            self._maps.add_unwind_mappings(pid, prefixes, target)
        except Exception as exc:  # the mappings map is full: the walk stops at this code
            log.warning("unwind mappings for pid %d not added: %s", pid, exc)
            return None
        if table is not None and key:
            table.users.add(pid)
            self._idle.pop(key, None)
        return key, prefixes

    def _target(
        self,
        mapping: Mapping,
        source: BinarySource | None,
        parsed: dict[str, UnwindTable | None],
    ) -> tuple[MappingTarget | None, _LoadedTable | None]:
        """Where the walker goes in this mapping, and the table it uses (lock held)."""
        if source is None:  # no file to read: frame pointers
            return MappingTarget.without_table(frame_pointers=True), None
        table = self._tables.get(source.key) or self._install(source.key, parsed)
        if table is None:
            refused = self._failed.get(source.key)
            if refused is None:
                return None, None  # another thread is parsing it
            # A refused table of code without frame pointers ends the walk, cleanly.
            return MappingTarget.without_table(frame_pointers=refused.frame_pointers), None
        bias = table_bias(mapping, table.loads, table.base)
        if bias is None:  # no segment of the file fits the mapping: no guessing there
            return MappingTarget.without_table(frame_pointers=False), None
        return MappingTarget(bias, table.first_row, table.row_count), table

    def _install(self, key: str, parsed: dict[str, UnwindTable | None]) -> _LoadedTable | None:
        """Write a parsed table into free rows; None when there is none or no room."""
        if key not in parsed:
            return None  # refused before, and still no room (or no file at all)
        table = parsed.pop(key)  # one install per prepare, whatever maps it twice
        if table is None:
            self._remember_failure(key, _NO_TABLE)
            return None
        first_row = self._allocator.allocate(len(table))
        while first_row is None and self._idle:  # make room: idle tables go first
            self._free_idle()
            first_row = self._allocator.allocate(len(table))
        if first_row is None:
            refused = _Refused(len(table), table.has_frame_pointers())
            log.warning(
                "unwind rows full: %s needs %d rows; its stacks %s there",
                key,
                len(table),
                "use frame pointers" if refused.frame_pointers else "end",
            )
            self._remember_failure(key, refused)
            return None
        self._failed.pop(key, None)
        self._maps.write_unwind_rows(first_row, table.packed)
        loaded = _LoadedTable(first_row, len(table), table.base, table.loads)
        self._tables[key] = loaded
        return loaded

    def _remember_failure(self, key: str, refused: _Refused) -> None:
        self._failed[key] = refused
        self._failed.move_to_end(key)
        while len(self._failed) > MAX_REMEMBERED_FAILURES:
            self._failed.popitem(last=False)

    def _replace_routes(
        self,
        pid: int,
        old: _Process | None,
        new: dict[tuple[int, int], tuple[str, tuple[Prefix, ...]]],
    ) -> None:
        if old is None:
            return
        kept = {prefix for _, prefixes in new.values() for prefix in prefixes}
        stale = [p for _, prefixes in old.routes.values() for p in prefixes if p not in kept]
        self._maps.remove_unwind_mappings(pid, stale)
        still_used = {key for key, _ in new.values()}
        for key, _ in old.routes.values():
            if key not in still_used:
                self._release(key, pid)

    def _forget(self, pid: int) -> None:
        entry = self._processes.pop(pid, None)
        if entry is None:
            return
        for key, prefixes in entry.routes.values():
            self._maps.remove_unwind_mappings(pid, prefixes)
            self._release(key, pid)

    def _release(self, key: str, pid: int) -> None:
        table = self._tables.get(key)
        if table is None:
            return
        table.users.discard(pid)
        if not table.users:
            self._idle[key] = self._clock()
            if self._idle_seconds <= 0:
                self._free_idle()

    def _free_idle(self) -> None:
        """Free the oldest idle table's rows (refused binaries may fit now)."""
        key, _ = self._idle.popitem(last=False)
        table = self._tables.pop(key)
        self._allocator.free(table.first_row)


@functools.cache
def _vdso_source() -> BinarySource | None:
    """The kernel's vDSO (one image for every process): parsed once, not per process
    (an ELF parse per exec was 90% of the unwind cost of a new process)."""
    image = own_vdso()
    if image is None:
        return None
    try:
        build_id = ElfInfo.from_stream(io.BytesIO(image)).build_id
    except ElfReadError:
        return None
    return BinarySource(f"vdso:{build_id}", lambda: io.BytesIO(image))


def resolve_binary(pid: int, mapping: Mapping, proc: Path = PROC) -> BinarySource | None:
    """The mapped file (or the vDSO) behind an executable mapping, keyed for sharing.

    A file mapped before (same device, inode and path in maps) gets its key without
    being looked at: it is found and opened only if its table must be parsed (not
    loaded, or freed since). Like the symbolizer's, this trusts that a file keeps its
    inode's content while mapped (package managers replace files, which gives a new
    inode)."""
    if mapping.path == VDSO:
        return _vdso_source()
    if not mapping.path.startswith("/"):
        return None  # anonymous memory (JIT code), [vsyscall]: no file
    identity = (mapping.dev, mapping.inode, mapping.path)
    known = _MAPPED_KEYS.get(identity)
    if known is not None:
        return BinarySource(known[0], functools.partial(_open_mapped, pid, mapping, proc), known[1])
    opened = open_mapped_file(pid, mapping, proc)
    if opened is None:
        return None
    key = _BINARY_KEYS.get(opened.file_key)
    if key is None:  # every process maps the same few libraries: read each build id once
        build_id = read_build_id(opened.path)
        key = f"buildid:{build_id}" if build_id else opened.file_key
        if len(_BINARY_KEYS) >= MAX_REMEMBERED_KEYS:
            _BINARY_KEYS.clear()
        _BINARY_KEYS[opened.file_key] = key
    path = opened.path
    if len(_MAPPED_KEYS) >= MAX_REMEMBERED_KEYS:
        _MAPPED_KEYS.clear()
    _MAPPED_KEYS[identity] = (key, opened.size)
    return BinarySource(key, lambda: open(path, "rb"), opened.size)


def _open_mapped(pid: int, mapping: Mapping, proc: Path) -> IO[bytes]:
    """The mapping's file, found now (through the process while it lives)."""
    opened = open_mapped_file(pid, mapping, proc)
    if opened is None:
        raise FileNotFoundError(f"{mapping.path} (pid {pid}) is gone")
    return open(opened.path, "rb")
