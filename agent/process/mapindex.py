"""Which of a process's mappings holds an address, by bisection over sorted starts.

Every frame of every stack in a window is looked up here (ProcessCache.get_covering,
the symbolizer): about a million lookups in a busy window, so a lookup must not cost a
scan of the mappings. /proc/PID/maps lists mappings sorted and disjoint, where the
mapping with the greatest start at or below an address is the only one that can hold
it. Hand-built mappings (tests, odd inputs) may overlap: then the index falls back to
the linear scan, whose answer (the first mapping in the given order) is the reference.
"""

from __future__ import annotations

import bisect

from agent.model import Mapping


class MappingIndex:
    """Immutable lookup structure for one tuple of mappings; build once, query often."""

    __slots__ = ("_ends", "_linear", "_sorted", "_starts", "mappings")

    def __init__(self, mappings: tuple[Mapping, ...]) -> None:
        self.mappings = mappings
        self._sorted = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self._sorted]
        self._ends = [m.end for m in self._sorted]
        self._linear = _overlapping(self._sorted)

    def find(self, address: int) -> Mapping | None:
        """The mapping that contains address (the first in order if several do), or None."""
        if self._linear:
            return next((m for m in self.mappings if m.contains(address)), None)
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and address < self._ends[index]:
            return self._sorted[index]
        return None


def _overlapping(ordered: list[Mapping]) -> bool:
    """Whether some mapping reaches past the start of a later one (sorted by start).

    Without that, no address lies in two mappings and the last start at or below an
    address names the only candidate.
    """
    reach = None
    for mapping in ordered:
        if reach is not None and reach > mapping.start:
            return True
        reach = mapping.end if reach is None else max(reach, mapping.end)
    return False
