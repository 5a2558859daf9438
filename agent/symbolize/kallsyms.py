"""Kernel symbols from /proc/kallsyms: address -> function, by bisection."""

from __future__ import annotations

import bisect
import logging

from agent.model import Frame

log = logging.getLogger(__name__)

TEXT_TYPES = frozenset("tTwW")  # code symbols; data (d, b, r, ...) never holds an IP


class Kallsyms:
    """Sorted kernel text symbols. Frame.file carries "[module]" for module symbols."""

    def __init__(self, symbols: list[tuple[int, str, str]]) -> None:
        """symbols: (address, name, module or "") in any order; zero addresses are dropped."""
        ordered = sorted((s for s in symbols if s[0]), key=lambda s: s[0])
        self._addresses = [s[0] for s in ordered]
        self._frames = [
            Frame(function=name, file=f"[{mod}]" if mod else "") for _, name, mod in ordered
        ]

    def __len__(self) -> int:
        return len(self._addresses)

    @classmethod
    def from_text(cls, text: str) -> Kallsyms:
        """Parse kallsyms text. With kptr_restrict every address reads 0: the result is empty."""
        symbols = []
        for line in text.splitlines():
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
                table = cls.from_text(f.read())
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
        return self._frames[index]
