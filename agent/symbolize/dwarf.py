"""Function, file and line with inlined frames from DWARF, through `symbolic`'s SymCache.

Building a SymCache is the slow part of symbolization (~0.3 s for a 23 MB library),
so it runs in Symbolizer.prepare, beside the sampling loop; lookups are ~0.2 ms.
"""

from __future__ import annotations

from typing import Any

from symbolic.debuginfo import Archive

from agent.model import Frame
from agent.symbolize.demangle import demangle


class DwarfError(Exception):
    """symbolic could not open or index the file."""


class DwarfIndex:
    """Address -> frames for one ELF file (the binary or its separate debug file)."""

    def __init__(self, symcache: Any, load_address: int) -> None:
        self._symcache = symcache
        # SymCache addresses are relative to the first PT_LOAD's p_vaddr.
        self._load_address = load_address

    @classmethod
    def build(cls, path: str, load_address: int) -> DwarfIndex:
        """Index `path`; load_address is its first PT_LOAD p_vaddr (ElfInfo.load_address)."""
        try:
            archive = Archive.open(path)
            objects = list(archive.iter_objects())
            if not objects:
                raise DwarfError(f"{path}: no object in file")
            return cls(objects[0].make_symcache(), load_address)
        except DwarfError:
            raise
        except Exception as exc:  # symbolic raises its own hierarchy and OSError-likes
            raise DwarfError(f"{path}: {type(exc).__name__}: {exc}") from exc

    def lookup(self, vaddr: int) -> tuple[Frame, ...]:
        """Frames at an ELF virtual address, innermost (inlined) first; () when unknown."""
        relative = vaddr - self._load_address
        if relative < 0:
            return ()
        try:
            matches = self._symcache.lookup(relative)
        except Exception:  # a corrupt index must not take the sampling loop down
            return ()
        return tuple(
            Frame(function=demangle(m.symbol), file=m.full_path or "", line=m.line or 0)
            for m in matches
            if m.symbol
        )
