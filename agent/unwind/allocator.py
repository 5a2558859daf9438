"""First-fit allocation of contiguous row ranges in the fixed-size BPF rows array.

Each binary's table occupies one contiguous range [start, start + size) of the global
array, so the BPF walker can binary-search it. Freed ranges merge with free neighbours,
so a long-running agent does not fragment its array into unusable slivers.
"""

from __future__ import annotations

import bisect


class RowAllocator:
    """Ranges of a `capacity`-row array; not thread-safe (the caller holds a lock)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._free_starts: list[int] = [0]  # sorted, disjoint, never adjacent
        self._free_sizes: list[int] = [capacity]
        self._used: dict[int, int] = {}  # start -> size

    @property
    def used(self) -> int:
        return sum(self._used.values())

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes, default=0)

    def allocate(self, size: int) -> int | None:
        """Start of a free range of `size` rows (lowest first fit), or None when none fits."""
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        for index, free in enumerate(self._free_sizes):
            if free < size:
                continue
            start = self._free_starts[index]
            if free == size:
                del self._free_starts[index]
                del self._free_sizes[index]
            else:
                self._free_starts[index] += size
                self._free_sizes[index] -= size
            self._used[start] = size
            return start
        return None

    def free(self, start: int) -> int:
        """Give back the range allocated at `start`; returns its size. KeyError if unknown."""
        size = self._used.pop(start)
        index = bisect.bisect_left(self._free_starts, start)
        merge_before = (
            index > 0 and self._free_starts[index - 1] + self._free_sizes[index - 1] == start
        )
        merge_after = index < len(self._free_starts) and start + size == self._free_starts[index]
        if merge_before and merge_after:
            self._free_sizes[index - 1] += size + self._free_sizes[index]
            del self._free_starts[index]
            del self._free_sizes[index]
        elif merge_before:
            self._free_sizes[index - 1] += size
        elif merge_after:
            self._free_starts[index] = start
            self._free_sizes[index] += size
        else:
            self._free_starts.insert(index, start)
            self._free_sizes.insert(index, size)
        return size

    def free_ranges(self) -> list[tuple[int, int]]:
        """(start, size) of each free range, in address order (for tests and metrics)."""
        return list(zip(self._free_starts, self._free_sizes, strict=True))
