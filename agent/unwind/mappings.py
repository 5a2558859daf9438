"""Where a process's mapping sends the BPF walker: address prefixes and the table bias.

The BPF program finds the table for an address with one LPM-trie lookup keyed by
(pid, address). A mapping [start, end) therefore becomes the few power-of-two aligned
blocks that tile it exactly, each a prefix of the 64-bit address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.elf.reader import LoadSegment
from agent.model import Mapping

ADDRESS_BITS = 64
PAGE_SIZE = 4096
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Prefix:
    """The addresses whose top `bits` bits equal `address`'s."""

    address: int
    bits: int


# struct mapping_value with row_count 0: how to walk code that has no table loaded.
ROUTE_FRAME_POINTERS = 0xFFFF_FFFE  # no .eh_frame (Go, JIT code), or built with them
ROUTE_STOP = 0xFFFF_FFFF  # table refused and no frame pointers: a guess would be junk


@dataclass(frozen=True)
class MappingTarget:
    """struct mapping_value: table pc = runtime address - bias (mod 2**64)."""

    bias: int
    first_row: int
    row_count: int

    @classmethod
    def without_table(cls, frame_pointers: bool) -> MappingTarget:
        """Code with no table: walk it with frame pointers, or end the stack there."""
        return cls(0, ROUTE_FRAME_POINTERS if frame_pointers else ROUTE_STOP, 0)


def address_prefixes(start: int, end: int) -> tuple[Prefix, ...]:
    """The largest aligned blocks that tile [start, end) exactly, lowest first."""
    if not 0 <= start < end <= 1 << ADDRESS_BITS:
        raise ValueError(f"bad address range {start:#x}-{end:#x}")
    prefixes = []
    while start < end:
        # The largest power of two that start is aligned to and that still fits.
        size = start & -start if start else 1 << ADDRESS_BITS
        while size > end - start:
            size >>= 1
        prefixes.append(Prefix(start, ADDRESS_BITS - size.bit_length() + 1))
        start += size
    return tuple(prefixes)


def load_of(mapping: Mapping, loads: Sequence[LoadSegment]) -> LoadSegment | None:
    """The PT_LOAD the mapping was made from.

    Mappings start page-aligned, so several segments can share the mapping's first
    page: lld packs the read-only segment and the executable one into the same file
    page. The segment whose permissions match the mapping's is the one it maps;
    among equals, the first whose file bytes the mapping starts in.
    """
    candidates = [load for load in loads if _starts_in(mapping.offset, load)]
    flags = _segment_flags(mapping.perms)
    return next((load for load in candidates if load.flags & 7 == flags), None) or next(
        iter(candidates), None
    )


def _starts_in(offset: int, load: LoadSegment) -> bool:
    page_start = load.offset - load.offset % PAGE_SIZE
    return page_start <= offset < load.offset + load.filesz


def _segment_flags(perms: str) -> int:
    """ELF p_flags (PF_R 4, PF_W 2, PF_X 1) of a /proc/PID/maps permission string."""
    return (
        (4 if perms[:1] == "r" else 0)
        | (2 if perms[1:2] == "w" else 0)
        | (1 if perms[2:3] == "x" else 0)
    )


def table_bias(mapping: Mapping, loads: Sequence[LoadSegment], table_base: int) -> int | None:
    """bias such that table pc = runtime address - bias, or None if no PT_LOAD fits.

    runtime address = vaddr - load.vaddr + load.offset - mapping.offset + mapping.start,
    and table pc = vaddr - table_base.
    """
    load = load_of(mapping, loads)
    if load is None:
        return None
    return (mapping.start - mapping.offset + load.offset - load.vaddr + table_base) & U64
