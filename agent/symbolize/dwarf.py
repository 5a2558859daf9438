"""Function, file and line with inlined frames from DWARF, through `symbolic`'s SymCache.

A SymCache is built once per binary in a capped child (symcache_child.py), stored on
disk (symbol_store.py) and opened here by mmap: lookups read the mapped file, so a big
library costs page cache, not Python objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from symbolic.symcache import SymCache

from agent.elf.reader import SymbolTable
from agent.model import Frame
from agent.symbolize.demangle import demangle
from agent.symbolize.names import clone_base, outer_name


class DwarfError(Exception):
    """The SymCache could not be opened (corrupt, truncated, or an old format)."""


def frame_of(symbol: str, file: str, line: int) -> Frame:
    """A Frame named by the demangled source-level symbol, keeping the raw one when they
    differ (`foo.cold` is `foo`: see names.py)."""
    name = demangle(clone_base(symbol))
    return Frame(function=name, file=file, line=line, system_name=symbol if name != symbol else "")


class DwarfIndex:
    """Address -> frames for one ELF file (the binary or its separate debug file)."""

    def __init__(
        self, symcache: Any, load_address: int, symbols: SymbolTable | None = None
    ) -> None:
        self._symcache = symcache
        # SymCache addresses are relative to the indexed file's first PT_LOAD p_vaddr.
        self._load_address = load_address
        self._symbols = symbols  # the ELF symbols that check the outermost name

    @classmethod
    def open(cls, path: Path, load_address: int, symbols: SymbolTable | None = None) -> DwarfIndex:
        """Map a stored SymCache; load_address is the indexed file's first PT_LOAD p_vaddr;
        symbols, the indexed file's ELF symbols (the SymCache's outer names are checked
        against them)."""
        try:
            symcache = SymCache.open(str(path))
            if not symcache.is_latest_version:
                raise DwarfError(f"{path}: SymCache format {symcache.version} is outdated")
        except DwarfError:
            raise
        except Exception as exc:  # symbolic raises its own hierarchy and OSError-likes
            raise DwarfError(f"{path}: {type(exc).__name__}: {exc}") from exc
        return cls(symcache, load_address, symbols)

    def lookup(self, vaddr: int) -> tuple[Frame, ...]:
        """Frames at an ELF virtual address, innermost (inlined) first; () when unknown."""
        relative = vaddr - self._load_address
        if relative < 0:
            return ()
        try:
            matches = [m for m in self._symcache.lookup(relative) if m.symbol]
        except Exception:  # a corrupt index must not take the sampling loop down
            return ()
        if not matches:
            return ()
        names = [m.symbol for m in matches]
        if self._symbols is not None:
            names[-1] = outer_name(names[-1], self._symbols.covering(vaddr))
        return tuple(
            frame_of(name, m.full_path or "", m.line or 0)
            for name, m in zip(names, matches, strict=True)
        )
