"""BinaryIndex, one mapped file's symbols: ELF (and Go) at once, DWARF frames once its
index is built; and where that binary's DWARF is to be found (`local_dwarf_source`)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from agent.elf.mapped_files import OpenedBinary
from agent.elf.reader import ElfInfo, ElfReadError, SymbolTable
from agent.metrics import BINARY_ERRORS
from agent.model import Frame
from agent.symbolize.debugfiles import find_debug_file
from agent.symbolize.dwarf import DwarfIndex, frame_of
from agent.symbolize.gopclntab import GoTable, GoTableError

MAX_CACHED_FRAMES = 16384  # per binary; hot addresses repeat every window


class DwarfState(Enum):
    PENDING = "pending"  # not indexed yet (or its file was gone when we tried)
    INDEXING = "indexing"
    WAITING = "waiting"  # for a debuginfod download; requeued when it ends
    READY = "ready"
    NONE = "none"  # no DWARF anywhere: ELF symbols are all there is
    FAILED = "failed"


@dataclass(frozen=True)
class _Lookup:
    """DWARF index and the frames cache that belongs to it, swapped together."""

    dwarf: DwarfIndex | None
    cache: dict[int, tuple[Frame, ...]] = field(default_factory=dict)


class BinaryIndex:
    """A mapped file's symbols: `frames` is cheap; DWARF comes later (dwarf_builder.py)."""

    def __init__(self, key: str, elf: ElfInfo, opened: OpenedBinary | None, mapped_path: str):
        self.key = key
        self.elf = elf
        self.opened = opened  # None for the vDSO (no file to index)
        self.mapped_path = mapped_path
        self.state = DwarfState.PENDING if opened is not None else DwarfState.NONE
        self._lookup = _Lookup(None)
        self.go = read_go_table(opened.path) if opened is not None and elf.is_go else None

    @property
    def build_id(self) -> str:
        """The GNU build id (what debug files and debuginfod are keyed by)."""
        return self.elf.build_id

    @property
    def mapping_build_id(self) -> str:
        """What a profile's mapping carries: the GNU build id, else Go's."""
        return self.elf.build_id or (self.go.build_id if self.go is not None else "")

    def frames(self, vaddr: int) -> tuple[Frame, ...]:
        """Frames at an ELF vaddr: DWARF when ready, else the ELF symbol; () if unknown."""
        lookup = self._lookup  # one read: a concurrent index swap cannot mix the two
        cached = lookup.cache.get(vaddr)
        if cached is not None:
            return cached
        frames = lookup.dwarf.lookup(vaddr) if lookup.dwarf is not None else ()
        if not frames and self.go is not None:
            frames = self.go.frames(vaddr)
        if not frames:
            name = self.elf.symbols.lookup(vaddr)
            frames = (frame_of(name, "", 0),) if name else ()
        if len(lookup.cache) >= MAX_CACHED_FRAMES:
            lookup.cache.clear()
        lookup.cache[vaddr] = frames
        return frames

    def install(self, state: DwarfState, dwarf: DwarfIndex | None = None) -> None:
        """Record an indexing outcome; a new DWARF index comes with an empty frames cache."""
        if dwarf is not None:
            self._lookup = _Lookup(dwarf)
        self.state = state

    def file_exists(self) -> bool:
        return self.opened is not None and os.path.exists(self.opened.path)


@dataclass(frozen=True)
class DwarfSource:
    """A file to index: its first PT_LOAD vaddr, and the ELF symbols that check names."""

    path: Path
    load_address: int
    symbols: SymbolTable


def local_dwarf_source(
    binary: BinaryIndex, opened: OpenedBinary, debug_dirs: tuple[str, ...]
) -> DwarfSource | None:
    """The file to index: the separate debug file, else the binary; None without DWARF."""
    roots = [opened.root] if opened.root == Path("/") else [opened.root, Path("/")]
    debug = find_debug_file(
        binary.mapped_path,
        binary.elf.build_id,
        binary.elf.debuglink,
        roots,
        debug_dirs,
        binary_file=Path(opened.path),
    )
    if debug is not None:
        try:
            debug_elf = ElfInfo.read(str(debug))
        except (OSError, ElfReadError):
            BINARY_ERRORS.labels(reason="debug_file").inc()
        else:
            if not debug_elf.build_id or debug_elf.build_id == binary.elf.build_id:
                return DwarfSource(
                    debug, debug_elf.load_address, checking_symbols(debug_elf, binary)
                )
    if binary.elf.has_dwarf:
        return DwarfSource(Path(opened.path), binary.elf.load_address, binary.elf.symbols)
    return None


def checking_symbols(debug_elf: ElfInfo, binary: BinaryIndex) -> SymbolTable:
    """A debug file's symbols (its .symtab has the static functions), else the binary's."""
    return debug_elf.symbols if len(debug_elf.symbols) else binary.elf.symbols


def read_go_table(path: str) -> GoTable | None:
    """The Go line table of a Go binary; None (counted) when it cannot be read."""
    try:
        return GoTable.read(path)
    except GoTableError:
        BINARY_ERRORS.labels(reason="go_table").inc()
    except OSError:
        BINARY_ERRORS.labels(reason="unreadable").inc()
    return None


def vdso_binary(image: bytes) -> BinaryIndex | None:
    """The vDSO as a BinaryIndex (ELF symbols only: it ships no DWARF)."""
    try:
        elf = ElfInfo.from_stream(io.BytesIO(image))
    except (OSError, ElfReadError):
        BINARY_ERRORS.labels(reason="vdso").inc()
        return None
    return BinaryIndex(f"vdso:{elf.build_id}", elf, None, "[vdso]")
