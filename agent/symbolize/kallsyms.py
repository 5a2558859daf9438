"""Kernel symbols from /proc/kallsyms: address -> function, by bisection.

A kernel has ~100k text symbols: as Python objects (a Frame each) they cost ~25 MB of
heap. They are kept packed instead (addresses in an array, names in one bytes blob)
and a Frame is made on lookup, with a small cache for the hot ones.
"""

from __future__ import annotations

import bisect
import functools
import logging
from array import array
from collections.abc import Iterable, Iterator

from agent.model import Frame

log = logging.getLogger(__name__)

TEXT_TYPES = frozenset("tTwW")  # code symbols; data (d, b, r, ...) never holds an IP
FRAME_CACHE = 4096  # kernel functions that show up in samples: hundreds to thousands


class Kallsyms:
    """Sorted kernel text symbols. Frame.file carries "[module]" for module symbols."""

    def __init__(self, symbols: list[tuple[int, str, str]]) -> None:
        """symbols: (address, name, module or "") in any order; zero addresses are dropped."""
        ordered = sorted((s for s in symbols if s[0]), key=lambda s: s[0])
        self._addresses = array("Q", (s[0] for s in ordered))
        names = [s[1].encode() for s in ordered]
        self._name_ends = array("Q", _running_sum(len(n) for n in names))
        self._names = b"".join(names)
        modules = sorted({s[2] for s in ordered})
        index_of = {module: i for i, module in enumerate(modules)}
        self._modules = [f"[{m}]" if m else "" for m in modules]
        self._module_of = array("I", (index_of[s[2]] for s in ordered))
        self.frame_at = functools.lru_cache(maxsize=FRAME_CACHE)(self._frame_at)

    def __len__(self) -> int:
        return len(self._addresses)

    @classmethod
    def from_text(cls, text: str) -> Kallsyms:
        """Parse kallsyms text. With kptr_restrict every address reads 0: the result is empty."""
        return cls.from_lines(text.splitlines())

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> Kallsyms:
        symbols = []
        for line in lines:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in TEXT_TYPES:
                continue
            try:
                address = int(parts[0], 16)
            except ValueError:
                continue
            module = parts[3].strip("[]") if len(parts) > 3 else ""
            symbols.append((address, parts[2], module))
        return cls(symbols)

    @classmethod
    def load(cls, path: str = "/proc/kallsyms") -> Kallsyms:
        """Read kallsyms; an unreadable file gives an empty table (kernel frames stay addresses)."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                table = cls.from_lines(f)
        except OSError as exc:
            log.warning("cannot read %s: %s; kernel frames stay unsymbolized", path, exc)
            return cls([])
        if not table:
            log.warning("%s has no usable addresses (kptr_restrict?)", path)
        return table

    def lookup(self, address: int) -> Frame | None:
        """The kernel function containing address (nearest symbol at or below it)."""
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0 or not address:
            return None
        return self.frame_at(index)

    def _frame_at(self, index: int) -> Frame:
        start = self._name_ends[index - 1] if index else 0
        name = self._names[start : self._name_ends[index]].decode(errors="replace")
        return Frame(function=name, file=self._modules[self._module_of[index]])


def _running_sum(lengths: Iterable[int]) -> Iterator[int]:
    total = 0
    for length in lengths:
        total += length
        yield total
