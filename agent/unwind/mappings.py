"""Where a process's mapping sends the BPF walker: address prefixes and the table bias.

The BPF program finds the table for an address with one LPM-trie lookup keyed by
(pid, address). A mapping [start, end) therefore becomes the few power-of-two aligned
blocks that tile it exactly, each a prefix of the 64-bit address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.model import Mapping
from agent.symbolize.elf import LoadSegment

ADDRESS_BITS = 64
PAGE_SIZE = 4096
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Prefix:
    """The addresses whose top `bits` bits equal `address`'s."""

    address: int
    bits: int


@dataclass(frozen=True)
class MappingTarget:
    """struct mapping_value: table pc = runtime address - bias (mod 2**64)."""

    bias: int
    first_row: int
    row_count: int


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
    """The PT_LOAD whose file bytes the mapping starts in (mappings start page-aligned)."""
    for load in loads:
        page_start = load.offset - load.offset % PAGE_SIZE
        if page_start <= mapping.offset < load.offset + load.filesz:
            return load
    return None


def table_bias(mapping: Mapping, loads: Sequence[LoadSegment], table_base: int) -> int | None:
    """bias such that table pc = runtime address - bias, or None if no PT_LOAD fits.

    runtime address = vaddr - load.vaddr + load.offset - mapping.offset + mapping.start,
    and table pc = vaddr - table_base.
    """
    load = load_of(mapping, loads)
    if load is None:
        return None
    return (mapping.start - mapping.offset + load.offset - load.vaddr + table_base) & U64
