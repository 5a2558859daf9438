"""The symbolization stage: (process, user stack, kernel stack) -> Locations.

symbolize() is on the sampling path and only does cheap work: it opens a binary
once (verified identity, ELF symbols) and uses a DWARF index only if one is ready.
DWARF indexing is the slow part; it happens in prepare(process) or
prepare_pending(), which a thread beside the sampling loop calls. A window thus
ships with ELF names at first and with inlined frames, files and lines later.
A frame symbolize() has seen in a process is memoized (memo.py): most of a window's
frames cost a dict lookup, and frame counts reach the metrics once per call.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.elf.mapped_files import PROC, VDSO, OpenedBinary, open_mapped_file, own_vdso
from agent.elf.reader import ElfInfo, ElfReadError, read_build_id, runtime_to_elf_vaddr
from agent.metrics import BINARY_ERRORS, SYMBOL_CACHE_BINARIES
from agent.model import Frame, Location, Mapping, ProcessInfo
from agent.symbolize.binary_index import BinaryIndex, DwarfState, vdso_binary
from agent.symbolize.debugfiles import DEFAULT_DEBUG_DIRS
from agent.symbolize.debuginfod import DebuginfodClient, Status, urls_from
from agent.symbolize.dwarf import frame_of
from agent.symbolize.dwarf_builder import BuildStats, DwarfBuilder
from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.memo import (
    JIT_HIT,
    JIT_MISS,
    KERNEL_HIT,
    KERNEL_MISS,
    USER_HIT,
    USER_MISS,
    AddressSpace,
    AddressSpaces,
    FrameCounts,
    Tally,
    memoized,
    unnamed,
)
from agent.symbolize.perfmap import PerfMaps, is_jit_candidate
from agent.symbolize.symbol_store import SymbolStore
from agent.symbolize.symcache_child import IndexLimits

if TYPE_CHECKING:
    from agent.config import Config

log = logging.getLogger(__name__)

FileIdentity = tuple[str, int, str]  # mapping dev, inode, path
DEFAULT_SYMBOL_CACHE_BYTES = 1 << 30
MAX_KERNEL_LOCATIONS = 1 << 16  # kernel addresses seen in samples: thousands


class Symbolizer:
    """Names addresses. Thread-safe: symbolize() and prepare*() may run concurrently.

    Binaries are cached by build id (dev + inode + mtime + size without one), at most
    max_binaries of them, least recently used out. A binary that cannot be opened or
    parsed is counted in strobe_binary_errors{reason} and retried after retry_seconds.
    DWARF indexes live on disk under cache_dir/symbols (a private temporary directory
    when cache_dir is None), bounded by symbol_cache_max_bytes; they are built in a
    child capped by index_limits. debuginfod (a client, or servers whose downloads go
    to cache_dir/debuginfod) supplies missing debug files and executables; perf maps
    name JIT code in anonymous executable memory.
    """

    def __init__(
        self,
        kallsyms: Kallsyms | None = None,
        max_binaries: int = 256,
        debug_dirs: Sequence[str] = DEFAULT_DEBUG_DIRS,
        proc: Path = PROC,
        retry_seconds: float = 60.0,
        *,
        cache_dir: str | Path | None = None,
        symbol_cache_max_bytes: int = DEFAULT_SYMBOL_CACHE_BYTES,
        index_limits: IndexLimits | None = None,
        debuginfod: DebuginfodClient | None = None,
        debuginfod_urls: Sequence[str] = (),
        perf_maps: PerfMaps | None = None,
    ) -> None:
        if max_binaries < 1:
            raise ValueError("max_binaries must be at least 1")
        self._kallsyms = kallsyms
        self._max_binaries = max_binaries
        self._proc = proc
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._binaries: OrderedDict[str, BinaryIndex] = OrderedDict()
        self._files: OrderedDict[FileIdentity, str | float] = OrderedDict()  # key or failed-at
        self._build_ids: OrderedDict[FileIdentity, str] = OrderedDict()  # for /executable
        self._pending: OrderedDict[str, None] = OrderedDict()  # keys awaiting DWARF
        self._spaces = AddressSpaces()  # per-process memo of the sampling path
        self._kernel_first: dict[int, Location] = {}
        self._kernel_returns: dict[int, Location] = {}
        self._kernel_unnamed = False  # whether a memoized kernel Location has no frames
        self._frame_counts = FrameCounts()  # published at the end of each window
        self._vdso: tuple[BinaryIndex | None, int] | None = None  # (index, image size)
        self._temp_dir = (
            tempfile.TemporaryDirectory(prefix="strobe-symbols-") if not cache_dir else None
        )
        root = Path(self._temp_dir.name if self._temp_dir else str(cache_dir))
        store = SymbolStore(root / "symbols", symbol_cache_max_bytes)
        if debuginfod is None and debuginfod_urls:
            debuginfod = DebuginfodClient(debuginfod_urls, root / "debuginfod")
        self._debuginfod = debuginfod
        self._builder = DwarfBuilder(
            store, tuple(str(d) for d in debug_dirs), index_limits or IndexLimits(), debuginfod
        )
        self._perf_maps = perf_maps if perf_maps is not None else PerfMaps(proc)
        self._waker: Callable[[], None] | None = None

    @classmethod
    def from_config(cls, config: Config) -> Symbolizer:
        """The agent's symbolizer: cache_dir, symbol_cache_max_bytes, debuginfod_urls.

        An unusable cache directory (read-only, not ours) falls back to a private
        temporary one rather than failing the agent: indexes then last one run.
        """
        cache_dir: Path | None = Path(config.cache_dir)
        try:
            (Path(config.cache_dir) / "symbols").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("symbol cache: cannot use %s (%s); indexes last one run", cache_dir, exc)
            cache_dir = None
        return cls(
            cache_dir=cache_dir,
            symbol_cache_max_bytes=config.symbol_cache_max_bytes,
            debuginfod_urls=urls_from(config.debuginfod_urls),
        )

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Called when work became pending off the sampling path (a download arrived)."""
        self._waker = waker

    @property
    def stats(self) -> BuildStats:
        """What DWARF indexing did: built, loaded from disk, failed (by reason)."""
        return self._builder.stats

    def use_kallsyms(self, kallsyms: Kallsyms) -> None:
        """Name kernel frames from now on (start-up loads the table beside the compile)."""
        self._kallsyms = kallsyms

    def end_window(self) -> None:
        """After a window is built: publish its frame counts (strobe_symbolize_frames)
        and forget the memo of processes that stopped running."""
        self._frame_counts.publish()
        self._spaces.end_window()

    def close(self) -> None:
        """Stop downloads and remove a private temporary cache. Idempotent."""
        if self._debuginfod is not None:
            self._debuginfod.close()
        if self._temp_dir is not None:
            self._temp_dir.cleanup()

    # --- the sampling path -------------------------------------------------------

    def symbolize(
        self,
        process: ProcessInfo | None,
        user_stack: tuple[int, ...],
        kernel_stack: tuple[int, ...],
    ) -> tuple[Location, ...]:
        """Locations innermost first: the kernel frames (kernel=True), then the user ones.

        Never raises for what a host contains; an unnamed frame keeps its address,
        mapping and (when known) build id, with no frames. Equal frames of a process
        may come back as the same Location object (memo.py).
        """
        tally = self._frame_counts.tally
        kernel = self._kernel_locations(kernel_stack, tally)
        return kernel + self._user_locations(process, user_stack, tally)

    def symbolize_address(
        self, process: ProcessInfo | None, address: int, return_address: bool = False
    ) -> Location:
        """One user address. Location.address stays the address given.

        Always looked up (the memo is only written): a per-frame reference for tests.
        """
        tally = self._frame_counts.tally
        if process is None:
            tally[USER_MISS] += 1
            return Location(address=address, mapping=None)
        space = self._spaces.get(process.mappings)
        return self._user_location(process, space, address, return_address, tally)

    def _kernel_locations(self, addresses: Sequence[int], tally: Tally) -> tuple[Location, ...]:
        # Kernel symbols never change: a Location per (address, depth > 0) is kept for good.
        locations = memoized(self._kernel_first, self._kernel_returns, addresses)
        if locations is None:
            locations = tuple(
                self._kernel_memoized(address, depth > 0) for depth, address in enumerate(addresses)
            )
        misses = unnamed(locations) if self._kernel_unnamed else 0
        tally[KERNEL_HIT] += len(locations) - misses
        tally[KERNEL_MISS] += misses
        return locations

    def _kernel_memoized(self, address: int, return_address: bool) -> Location:
        memo = self._kernel_returns if return_address else self._kernel_first
        location = memo.get(address)
        if location is None:
            location = self._kernel_location(address, return_address)
            if len(memo) >= MAX_KERNEL_LOCATIONS:
                memo.clear()
            memo[address] = location
            self._kernel_unnamed = self._kernel_unnamed or not location.frames
        return location

    def _kernel_location(self, address: int, return_address: bool) -> Location:
        lookup = address - 1 if return_address else address  # return address -> the call
        frame = self._kallsyms.lookup(lookup) if self._kallsyms is not None else None
        frames = (frame,) if frame else ()
        return Location(address=address, mapping=None, frames=frames, kernel=True)

    def _user_locations(
        self, process: ProcessInfo | None, addresses: Sequence[int], tally: Tally
    ) -> tuple[Location, ...]:
        if process is None:
            tally[USER_MISS] += len(addresses)
            return tuple(Location(address=address, mapping=None) for address in addresses)
        space = self._spaces.get(process.mappings)
        locations = memoized(space.first, space.returns, addresses)
        if locations is None:  # some frame is new (or JIT): one at a time
            return self._user_locations_slow(process, space, addresses, tally)
        misses = unnamed(locations) if space.unnamed else 0  # memoized: all kind "user"
        tally[USER_HIT] += len(locations) - misses
        tally[USER_MISS] += misses
        return locations

    def _user_locations_slow(
        self, process: ProcessInfo, space: AddressSpace, addresses: Sequence[int], tally: Tally
    ) -> tuple[Location, ...]:
        locations = []
        memo = space.first
        for address in addresses:
            location = memo.get(address)
            if location is None:
                return_address = memo is space.returns
                location = self._user_location(process, space, address, return_address, tally)
            else:
                tally[USER_HIT if location.frames else USER_MISS] += 1
            locations.append(location)
            memo = space.returns
        return tuple(locations)

    def _user_location(
        self,
        process: ProcessInfo,
        space: AddressSpace,
        address: int,
        return_address: bool,
        tally: Tally,
    ) -> Location:
        """A user frame not memoized in `space`: looked up, counted, memoized (not JIT)."""
        lookup = address - 1 if return_address else address
        mapping = space.index.find(lookup)
        if mapping is not None and is_jit_candidate(mapping):
            location = self._jit_location(process, mapping, address, lookup)
            tally[JIT_HIT if location.frames else JIT_MISS] += 1
            return location  # perf maps grow while the JIT runs: never memoized
        binary = self._binary_for(process.pid, mapping) if mapping is not None else None
        if mapping is None or binary is None:
            location = Location(address=address, mapping=mapping)
            tally[USER_MISS] += 1
            # What no file backs stays unnamed; a file that failed to open is retried.
            if mapping is None or self._memoize_failure(space, mapping):
                self._spaces.remember(space, return_address, address, location)
            return location
        space.binaries.add(binary.key)  # before reading frames: see forget_binary
        vaddr = runtime_to_elf_vaddr(lookup, mapping, binary.elf.loads)
        frames = binary.frames(vaddr) if vaddr is not None else ()
        location = Location(
            address=address, mapping=mapping, build_id=binary.mapping_build_id, frames=frames
        )
        tally[USER_HIT if frames else USER_MISS] += 1
        self._spaces.remember(space, return_address, address, location)
        return location

    def _memoize_failure(self, space: AddressSpace, mapping: Mapping) -> bool:
        """Whether an unnamed frame of `mapping` may be memoized in `space`, and until when.

        Memory no file backs: for good. A file that failed to open: until its retry time
        (the space expires then), or until _forget_failure drops the space (a download
        ended). The key goes into space.binaries before the failure is read back, so a
        forget that runs in between either finds the key or left no failure to read.
        """
        if not mapping.path.startswith("/"):
            return True
        identity = (mapping.dev, mapping.inode, mapping.path)
        space.binaries.add(_failure_key(identity))
        retry_at = self._retry_at(identity)
        if retry_at is None:
            return False  # forgotten already (or its record evicted): retry next time
        space.expires = min(space.expires or retry_at, retry_at)
        return True

    def _jit_location(
        self, process: ProcessInfo, mapping: Mapping, address: int, lookup: int
    ) -> Location:
        name = self._perf_maps.lookup(process, lookup)
        frames: tuple[Frame, ...] = (frame_of(name, "", 0),) if name else ()
        return Location(address=address, mapping=mapping, frames=frames)

    # --- the slow path, beside the sampling loop ---------------------------------

    def prepare(self, process: ProcessInfo) -> int:
        """Open every binary `process` maps and build the DWARF indexes still missing.

        Returns how many indexes became ready. Slow (DWARF); never call it from the
        sampling loop.
        """
        ready = 0
        seen: set[str] = set()
        if any(is_jit_candidate(m) for m in process.mappings):
            self._perf_maps.preload(process)  # while the process (and its /tmp) still exists
        for mapping in process.mappings:
            binary = self._binary_for(process.pid, mapping)
            if binary is None or binary.key in seen:
                continue
            seen.add(binary.key)
            if binary.state is DwarfState.PENDING:
                self._reopen_if_gone(binary, process.pid, mapping)
                ready += self._index(binary)
        return ready

    def needs_prepare(self, process: ProcessInfo) -> bool:
        """Whether prepare(process) has anything to do: a file it maps that was never
        opened (or whose failure is due a retry) or whose DWARF index is still to be
        built (prepare reopens it through this live process), or JIT code (its perf map
        is read while the process lives). A few dictionary lookups: under churn, new
        processes map the same few binaries again and again."""
        if any(is_jit_candidate(m) for m in process.mappings):
            return True
        now = time.monotonic()
        with self._lock:
            return any(self._unsettled(mapping, now) for mapping in process.mappings)

    def _unsettled(self, mapping: Mapping, now: float) -> bool:
        """Lock held. prepare() would open the mapping's file or build its index."""
        if mapping.path == VDSO:
            return self._vdso is None
        if not mapping.path.startswith("/"):
            return False  # nothing to read (anonymous memory, [vsyscall], ...)
        return not self._settled((mapping.dev, mapping.inode, mapping.path), now)

    def _settled(self, identity: FileIdentity, now: float) -> bool:
        """Lock held. The file was opened and has no index left to build, or it failed
        to open and is not due a retry yet."""
        known = self._files.get(identity)
        if isinstance(known, float):
            return now - known < self._retry_seconds
        binary = self._binaries.get(known) if known is not None else None
        return binary is not None and binary.state is not DwarfState.PENDING

    def prepare_pending(self, limit: int | None = None) -> int:
        """Index binaries that symbolize() met without a DWARF index; returns how many."""
        ready = 0
        while limit is None or limit > 0:
            with self._lock:
                if not self._pending:
                    break
                key, _ = self._pending.popitem(last=False)
                binary = self._binaries.get(key)
            if binary is not None:
                ready += self._index(binary)
            if limit is not None:
                limit -= 1
        return ready

    def pending(self) -> int:
        """How many binaries wait for prepare_pending()."""
        return len(self._pending)

    def binary_count(self) -> int:
        return len(self._binaries)

    def awaiting_downloads(self) -> bool:
        """Whether a binary waits for a debuginfod download (requeued when it ends)."""
        with self._lock:
            return any(b.state is DwarfState.WAITING for b in self._binaries.values())

    # --- internals -----------------------------------------------------------------

    def _index(self, binary: BinaryIndex) -> int:
        with self._lock:
            if binary.state is not DwarfState.PENDING:
                return 0
            binary.state = DwarfState.INDEXING
        if not self._builder.index(binary, lambda: self._requeue(binary.key)):
            return 0
        self._spaces.forget_binary(binary.key)  # memoized Locations have its ELF names
        return 1

    def _requeue(self, key: str) -> None:
        """A debuginfod download for key ended: index it again (or settle for ELF symbols)."""
        with self._lock:
            binary = self._binaries.get(key)
            if binary is None or binary.state is not DwarfState.WAITING:
                return
            binary.state = DwarfState.PENDING
            self._pending[key] = None
        if self._waker is not None:
            self._waker()

    def _reopen_if_gone(self, binary: BinaryIndex, pid: int, mapping: Mapping) -> None:
        # The path stored at first sight may belong to a process that has exited.
        if binary.opened is None or Path(binary.opened.path).exists():
            return
        opened = open_mapped_file(pid, mapping, self._proc)
        if opened is not None:
            binary.opened = opened
            binary.mapped_path = mapping.path

    def _retry_at(self, identity: FileIdentity) -> float | None:
        """When a file that failed to open will be tried again (time.monotonic()); None
        when no failure of it is on record."""
        with self._lock:
            failed_at = self._files.get(identity)
        return failed_at + self._retry_seconds if isinstance(failed_at, float) else None

    def _binary_for(self, pid: int, mapping: Mapping) -> BinaryIndex | None:
        """The cached index for a mapping's file, opening and verifying it on first sight."""
        if mapping.path == VDSO:
            return self._vdso_for(mapping)
        if not mapping.path.startswith("/"):
            return None  # anonymous (JIT) or special memory: nothing to read
        identity = (mapping.dev, mapping.inode, mapping.path)
        with self._lock:
            known = self._files.get(identity)
            if isinstance(known, str) and known in self._binaries:
                self._files.move_to_end(identity)
                self._binaries.move_to_end(known)
                return self._binaries[known]
            if isinstance(known, float) and time.monotonic() - known < self._retry_seconds:
                return None
        binary = self._open(pid, mapping)
        if binary is None and identity in self._build_ids:
            binary = self._downloaded_executable(identity, mapping)
        with self._lock:
            self._files[identity] = binary.key if binary is not None else time.monotonic()
            self._files.move_to_end(identity)
            while len(self._files) > self._max_binaries * 8:
                self._files.popitem(last=False)
            if binary is not None and binary.build_id:
                self._build_ids[identity] = binary.build_id
                self._build_ids.move_to_end(identity)
                while len(self._build_ids) > self._max_binaries * 8:
                    self._build_ids.popitem(last=False)
        return binary

    def _downloaded_executable(
        self, identity: FileIdentity, mapping: Mapping
    ) -> BinaryIndex | None:
        """A file we knew (by build id) is gone: its executable from debuginfod, if it has it.

        Without it in the disk cache yet, a download starts; when it ends the failure
        is forgotten so the next sample retries.
        """
        if self._debuginfod is None:
            return None
        build_id = self._build_ids[identity]
        status, path = self._debuginfod.request(
            build_id, "executable", lambda _: self._forget_failure(identity)
        )
        if status is not Status.READY or path is None:
            return None
        try:
            st = os.stat(path)
            elf = ElfInfo.read(str(path))
        except (OSError, ElfReadError):
            BINARY_ERRORS.labels(reason="malformed").inc()
            return None
        opened = OpenedBinary(
            str(path), Path("/"), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size
        )
        return self._add(BinaryIndex(f"build:{build_id}", elf, opened, mapping.path))

    def _forget_failure(self, identity: FileIdentity) -> None:
        with self._lock:
            if isinstance(self._files.get(identity), float):
                del self._files[identity]
        self._spaces.forget_binary(_failure_key(identity))  # its memoized unnamed frames

    def _open(self, pid: int, mapping: Mapping) -> BinaryIndex | None:
        opened = open_mapped_file(pid, mapping, self._proc)
        if opened is None:
            BINARY_ERRORS.labels(reason="not_found").inc()
            return None
        build_id = read_build_id(opened.path)
        key = f"build:{build_id}" if build_id else opened.file_key
        with self._lock:
            if key in self._binaries:
                return self._binaries[key]
        elf = self._read_elf(opened)
        if elf is None:
            return None
        return self._add(BinaryIndex(key, elf, opened, mapping.path))

    def _read_elf(self, opened: OpenedBinary) -> ElfInfo | None:
        try:
            return ElfInfo.read(opened.path)
        except ElfReadError:
            BINARY_ERRORS.labels(reason="malformed").inc()
        except PermissionError:
            BINARY_ERRORS.labels(reason="permission").inc()
        except OSError:
            BINARY_ERRORS.labels(reason="unreadable").inc()
        return None

    def _add(self, binary: BinaryIndex) -> BinaryIndex:
        with self._lock:
            existing = self._binaries.get(binary.key)
            if existing is not None:  # another thread opened it meanwhile
                return existing
            if len(self._binaries) >= self._max_binaries:
                self._touch_memoized()
            self._binaries[binary.key] = binary
            if binary.state is DwarfState.PENDING:
                self._pending[binary.key] = None
            while len(self._binaries) > self._max_binaries:
                evicted, _ = self._binaries.popitem(last=False)
                self._pending.pop(evicted, None)
                self._spaces.forget_binary(evicted)
            SYMBOL_CACHE_BINARIES.set(len(self._binaries))
        return binary

    def _touch_memoized(self) -> None:
        """Count memoized frames as uses of their binaries before choosing one to evict.

        Memo hits bypass _binary_for, which keeps the LRU order: without this, the
        binaries used most would look unused and be evicted first. Caller holds the lock.
        """
        for key in self._spaces.used_binaries():
            if key in self._binaries:
                self._binaries.move_to_end(key)

    def _vdso_for(self, mapping: Mapping) -> BinaryIndex | None:
        if self._vdso is None:
            image = own_vdso()
            binary = vdso_binary(image) if image else None
            self._vdso = (binary, len(image) if image else 0)
        binary, size = self._vdso
        # A 32-bit process maps another vDSO image: only trust one of our size.
        return binary if mapping.end - mapping.start == size else None


def _failure_key(identity: FileIdentity) -> str:
    """What space.binaries holds for a file that failed to open (binaries hold keys)."""
    dev, inode, path = identity
    return f"failed:{dev}:{inode}:{path}"
