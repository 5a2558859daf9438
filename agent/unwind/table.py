"""Compact unwind tables from a binary's call frame information (.eh_frame, .debug_frame).

A table is a sorted list of rows; a row holds from its `pc` up to the next row's pc and
says how the BPF walker (bpf/profile.bpf.c) gets from a frame to its caller on x86_64:

    CFA     = rsp + cfa_offset | rbp + cfa_offset | a PLT stub's CFA | (no rule)
    caller's rip = [CFA - 8]       (the x86_64 ABI; other return address rules are refused)
    caller's rsp = CFA
    caller's rbp = [CFA + rbp_offset] when rbp_offset != 0, else rbp itself

Row pcs are relative to the table's `base` (an ELF virtual address) so they fit in 32
bits. Between two FDEs, a NONE row marks the gap: the walker falls back to frame pointers
there. The CFI itself is parsed by agent.unwind.cfi; everything here is pure.
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import IO, NamedTuple

from elftools.elf.elffile import ELFFile

from agent.symbolize.elf import LoadSegment
from agent.unwind.cfi import OFFSET, UNDEFINED, CfiError, FrameRules, iter_fdes

RSP, RBP = 7, 6  # DWARF register numbers on x86_64
ROW_FORMAT = struct.Struct("<IBbh")  # struct unwind_row in bpf/profile.bpf.c
ROW_SIZE = ROW_FORMAT.size
MAX_TABLE_SPAN = 1 << 32  # row pcs are u32 offsets from the base
PADDING_GAP = 16  # a smaller gap between two FDEs is alignment padding: no NONE row
S16 = (-(1 << 15), (1 << 15) - 1)
S8 = (-(1 << 7), (1 << 7) - 1)

# DW_CFA_def_cfa_expression that binutils writes for PLT stubs:
#   rsp + 8 + (((rip & 15) >= N) << 3), N being a DW_OP_lit.
_PLT_PREFIX = bytes((0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A))  # breg7 8; breg16 0; lit15; and
_PLT_SUFFIX = bytes((0x2A, 0x33, 0x24, 0x22))  # ge; lit3; shl; plus
_DW_OP_LIT0, _DW_OP_LIT31 = 0x30, 0x4F


class CfaKind(IntEnum):
    """enum cfa_kind in bpf/profile.bpf.c."""

    NONE = 0  # no unwind information here: frame-pointer step
    RSP = 1
    RBP = 2
    PLT = 3  # cfa_offset holds the PLT threshold
    END = 4  # the outermost frame: the return address is undefined
    UNSUPPORTED = 5  # a rule the walker cannot follow: frame-pointer step


class UnwindRow(NamedTuple):
    pc: int  # table pc (ELF vaddr - base) where the row starts
    kind: CfaKind
    cfa_offset: int = 0
    rbp_offset: int = 0  # bytes from the CFA (a multiple of 8); 0: rbp unchanged

    def rule(self) -> tuple[CfaKind, int, int]:
        return (self.kind, self.cfa_offset, self.rbp_offset)


class UnwindTableError(Exception):
    """The file has no usable call frame information, or it is malformed."""


@dataclass(frozen=True)
class UnwindTable:
    base: int  # ELF virtual address of table pc 0
    rows: tuple[UnwindRow, ...]
    loads: tuple[LoadSegment, ...] = ()  # to translate runtime addresses into vaddrs

    def __len__(self) -> int:
        return len(self.rows)

    def packed(self) -> bytes:
        """The rows as the BPF program reads them (8 bytes each)."""
        return b"".join(pack_row(row) for row in self.rows)

    def row_for(self, vaddr: int) -> UnwindRow | None:
        """The row covering an ELF virtual address (as the BPF search finds it)."""
        index = bisect.bisect_right(self.rows, vaddr - self.base, key=lambda row: row.pc)
        return self.rows[index - 1] if index > 0 else None


class FdeRows(NamedTuple):
    start: int  # ELF vaddrs
    end: int
    rows: list[UnwindRow]  # absolute pcs (vaddrs), within [start, end)


def pack_row(row: UnwindRow) -> bytes:
    return ROW_FORMAT.pack(row.pc, int(row.kind), row.rbp_offset // 8, row.cfa_offset)


def plt_threshold(expression: Sequence[int]) -> int | None:
    """N of binutils' PLT CFA expression, or None for any other expression."""
    expr = bytes(expression)
    if len(expr) != len(_PLT_PREFIX) + 1 + len(_PLT_SUFFIX):
        return None
    if not expr.startswith(_PLT_PREFIX) or not expr.endswith(_PLT_SUFFIX):
        return None
    literal = expr[len(_PLT_PREFIX)]
    return literal - _DW_OP_LIT0 if _DW_OP_LIT0 <= literal <= _DW_OP_LIT31 else None


@functools.lru_cache(maxsize=4096)
def rule_of(rules: FrameRules) -> tuple[CfaKind, int, int]:
    """(kind, cfa_offset, rbp_offset) of the rules at some pc, as the walker follows them."""
    if rules.ra[0] == UNDEFINED:
        return (CfaKind.END, 0, 0)
    if rules.ra != (OFFSET, -8):
        return (CfaKind.UNSUPPORTED, 0, 0)
    if rules.cfa_expr:
        threshold = plt_threshold(rules.cfa_expr)
        return (CfaKind.PLT, threshold, 0) if threshold is not None else (CfaKind.UNSUPPORTED, 0, 0)
    if rules.cfa_reg not in (RSP, RBP) or not S16[0] <= rules.cfa_offset <= S16[1]:
        return (CfaKind.UNSUPPORTED, 0, 0)
    kind = CfaKind.RSP if rules.cfa_reg == RSP else CfaKind.RBP
    return (kind, rules.cfa_offset, rbp_offset(rules.rbp))


def rbp_offset(rule: tuple[int, int]) -> int:
    """Where rbp is saved (bytes from the CFA), 0 when unchanged or not representable."""
    kind, offset = rule
    if kind != OFFSET or offset % 8 or not S8[0] <= offset // 8 <= S8[1]:
        return 0
    return offset


def fde_rows(rows: Iterable[tuple[int, FrameRules]], start: int, end: int) -> FdeRows:
    out = [UnwindRow(pc, *rule_of(rules)) for pc, rules in rows if start <= pc < end]
    return FdeRows(start, end, out)


def merge_fdes(fdes: Iterable[FdeRows]) -> UnwindTable:
    """One sorted table from many FDEs: gaps become NONE rows, equal neighbours merge.

    An FDE that overlaps one that starts before it is dropped; among FDEs that start
    at the same address the first listed wins, so list the preferred source first.
    """
    taken: list[FdeRows] = []
    for fde in sorted(fdes, key=lambda f: f.start):  # stable: listing order among equals
        if fde.end <= fde.start or not fde.rows:
            continue
        if taken and fde.start < taken[-1].end:
            continue
        taken.append(fde)
    if not taken:
        raise UnwindTableError("no frame description entries")
    base = taken[0].start
    rows: list[UnwindRow] = []
    for index, fde in enumerate(taken):
        if fde.end - base > MAX_TABLE_SPAN:
            break
        rows.extend(row._replace(pc=row.pc - base) for row in fde.rows)
        next_start = taken[index + 1].start if index + 1 < len(taken) else None
        if next_start is None or next_start - fde.end >= PADDING_GAP:
            rows.append(UnwindRow(fde.end - base, CfaKind.NONE))
    return UnwindTable(base, tuple(compact(rows)))


def compact(rows: Iterable[UnwindRow]) -> list[UnwindRow]:
    """Keep the last rule given at each pc, and drop rows that repeat their predecessor."""
    by_pc: dict[int, UnwindRow] = {}
    for row in rows:
        by_pc[row.pc] = row
    out: list[UnwindRow] = []
    for pc in sorted(by_pc):
        row = by_pc[pc]
        if out and out[-1].rule() == row.rule():
            continue
        out.append(row)
    return out


def read_unwind_table(stream: IO[bytes]) -> UnwindTable:
    """The unwind table of an x86_64 ELF file (.eh_frame first, then .debug_frame).

    Raises UnwindTableError when there is none or the file is malformed; OSError when
    it cannot be read.
    """
    try:
        elf = ELFFile(stream)
        if elf["e_machine"] != "EM_X86_64":
            raise UnwindTableError(f"unsupported machine {elf['e_machine']}")
        fdes: list[FdeRows] = []
        for name, eh_frame in ((".eh_frame", True), (".debug_frame", False)):
            section = elf.get_section_by_name(name)
            if section is None or section["sh_type"] == "SHT_NOBITS":
                continue
            for fde in iter_fdes(section.data(), section["sh_addr"], eh_frame):
                fdes.append(fde_rows(fde.rows, fde.start, fde.end))
        table = merge_fdes(fdes)
        loads = tuple(
            LoadSegment(h.p_offset, h.p_vaddr, h.p_filesz, h.p_memsz, h.p_flags)
            for h in (segment.header for segment in elf.iter_segments())
            if h.p_type == "PT_LOAD"
        )
    except (UnwindTableError, OSError):
        raise
    except CfiError as exc:
        raise UnwindTableError(str(exc)) from exc
    except Exception as exc:  # pyelftools raises many types on malformed ELF
        raise UnwindTableError(f"{type(exc).__name__}: {exc}") from exc
    return UnwindTable(table.base, table.rows, loads)
