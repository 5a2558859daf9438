"""DwarfBuilder: from a binary to a ready DWARF index, the slow way round, beside the
sampling loop.

    1. the disk cache has it (built by an earlier run or thread): map it, done
    2. a failure was recorded recently: ELF symbols only, until it expires
    3. find DWARF: the separate debug file, the binary itself, else debuginfod
       (a download in progress leaves the binary WAITING; the callback requeues it)
    4. build the SymCache in a capped child, under the entry's lock, and store it
A failure is counted in strobe_binary_errors{reason}; frames keep their ELF names.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.elf.reader import ElfInfo, ElfReadError, SymbolTable
from agent.metrics import BINARY_ERRORS
from agent.symbolize.binary_index import (
    BinaryIndex,
    DwarfSource,
    DwarfState,
    checking_symbols,
    local_dwarf_source,
)
from agent.symbolize.debuginfod import DebuginfodClient, Status
from agent.symbolize.dwarf import DwarfError, DwarfIndex
from agent.symbolize.symbol_store import SymbolStore
from agent.symbolize.symcache_child import IndexFailure, IndexLimits, build_symcache

log = logging.getLogger(__name__)


@dataclass
class BuildStats:
    """What the builder did (tests and benchmarks read these)."""

    built: int = 0  # SymCaches built by a child
    loaded: int = 0  # SymCaches mapped from the disk cache
    failed: int = 0
    last_peak_rss_bytes: int = 0
    last_seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


class DwarfBuilder:
    """Indexes binaries through the disk cache, local debug files and debuginfod."""

    def __init__(
        self,
        store: SymbolStore,
        debug_dirs: tuple[str, ...],
        limits: IndexLimits,
        debuginfod: DebuginfodClient | None = None,
    ) -> None:
        self.store = store
        self.debug_dirs = debug_dirs
        self.limits = limits
        self.debuginfod = debuginfod
        self.stats = BuildStats()

    def index(self, binary: BinaryIndex, on_download: Callable[[], None]) -> bool:
        """Bring binary's DWARF index up; True when it became READY.

        on_download runs (on a download thread) when a debuginfod fetch this call
        started has ended: the caller requeues the binary then.
        """
        dwarf = self._open_cached(binary.key, lambda: self._symbols_of(binary))
        if dwarf is not None:
            binary.install(DwarfState.READY, dwarf)
            return True
        if self.store.failure(binary.key) is not None:
            binary.install(DwarfState.FAILED)
            return False
        source = self._source(binary, on_download)
        if isinstance(source, DwarfState):
            binary.install(source)
            return False
        dwarf = self._build(binary.key, source)
        binary.install(DwarfState.READY if dwarf else DwarfState.FAILED, dwarf)
        return dwarf is not None

    def _symbols_of(self, binary: BinaryIndex) -> SymbolTable:
        """The symbols that check a cached index's names: its debug file's, if local."""
        present = binary.opened is not None and binary.file_exists()
        local = None
        if present and binary.opened is not None:
            local = local_dwarf_source(binary, binary.opened, self.debug_dirs)
        return local.symbols if local is not None else binary.elf.symbols

    def _source(
        self, binary: BinaryIndex, on_download: Callable[[], None]
    ) -> DwarfSource | DwarfState:
        """Where the DWARF is, or the state to leave the binary in when it is nowhere yet."""
        present = binary.opened is not None and binary.file_exists()
        if present and binary.opened is not None:
            local = local_dwarf_source(binary, binary.opened, self.debug_dirs)
            if local is not None:
                return local
        if self.debuginfod is not None and binary.build_id:
            status, path = self.debuginfod.request(
                binary.build_id, "debuginfo", lambda _: on_download()
            )
            if status is Status.PENDING:
                return DwarfState.WAITING
            if status is Status.READY and path is not None:
                return self._downloaded_source(path, binary)
        # A file that went away may come back with a later process (prepare reopens it).
        return DwarfState.NONE if present else DwarfState.PENDING

    @staticmethod
    def _downloaded_source(path: Path, binary: BinaryIndex) -> DwarfSource | DwarfState:
        try:
            elf = ElfInfo.read(str(path))
        except (OSError, ElfReadError):
            BINARY_ERRORS.labels(reason="debug_file").inc()
            return DwarfState.FAILED
        load_address = elf.load_address if elf.loads else binary.elf.load_address
        return DwarfSource(path, load_address, checking_symbols(elf, binary))

    def _open_cached(
        self, key: str, symbols: Callable[[], SymbolTable | None]
    ) -> DwarfIndex | None:
        cached = self.store.lookup(key)
        if cached is None:
            return None
        try:
            dwarf = DwarfIndex.open(cached.path, cached.load_address, symbols())
        except DwarfError as exc:
            log.info("dropping unusable symbol cache entry: %s", exc)
            self.store.discard(key)
            return None
        self.stats.loaded += 1
        return dwarf

    def _build(self, key: str, source: DwarfSource) -> DwarfIndex | None:
        """Build, store and map the SymCache of source; one builder per key at a time."""
        path, load_address = source.path, source.load_address
        with self.store.locked(key):
            # Built by another thread or process meanwhile?
            dwarf = self._open_cached(key, lambda: source.symbols)
            if dwarf is not None:
                return dwarf
            temp = self.store.temp_path(key)
            try:
                result = build_symcache(path, temp, self.limits)
                # Mapped before commit: if the bound evicts it at once, the mapping stays valid.
                dwarf = DwarfIndex.open(temp, load_address, source.symbols)
                self.store.commit(key, temp, load_address)
            except (IndexFailure, DwarfError) as exc:
                reason = exc.reason if isinstance(exc, IndexFailure) else "dwarf"
                self._failed(key, reason, str(exc))
                return None
            except OSError as exc:  # the cache directory itself failed: not the binary's fault
                BINARY_ERRORS.labels(reason="cache").inc()
                log.warning("symbol cache: %s", exc)
                return None
            finally:
                with contextlib.suppress(OSError):
                    temp.unlink()
        self.stats.built += 1
        self.stats.last_peak_rss_bytes = result.peak_rss_bytes
        self.stats.last_seconds = result.seconds
        return dwarf

    def _failed(self, key: str, reason: str, detail: str) -> None:
        BINARY_ERRORS.labels(reason=reason).inc()
        self.store.mark_failed(key, reason)
        self.stats.failed += 1
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
        log.info("cannot index DWARF (%s): %s", reason, detail)
