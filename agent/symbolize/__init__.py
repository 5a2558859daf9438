"""Symbolize stage: addresses -> Locations (kallsyms, ELF symbols, DWARF via symbolic)."""

from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.symbolizer import Symbolizer

__all__ = ["Kallsyms", "Symbolizer"]
