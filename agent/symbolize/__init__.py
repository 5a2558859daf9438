"""Symbolize stage: addresses -> Locations (kallsyms, ELF symbols read by agent/elf, DWARF
via symbolic).

Names are imported lazily so that the SymCache child (symcache_child.py) starts lean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.symbolize.kallsyms import Kallsyms
    from agent.symbolize.symbolizer import Symbolizer

__all__ = ["Kallsyms", "Symbolizer"]


def __getattr__(name: str) -> Any:
    if name == "Kallsyms":
        from agent.symbolize.kallsyms import Kallsyms

        return Kallsyms
    if name == "Symbolizer":
        from agent.symbolize.symbolizer import Symbolizer

        return Symbolizer
    raise AttributeError(name)
