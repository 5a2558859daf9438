"""Compact unwind tables from a binary's call frame information (.eh_frame, .debug_frame).

A table is a sorted list of rows; a row holds from its `pc` up to the next row's pc and
says how the BPF walker (bpf/profile.bpf.c) gets from a frame to its caller on x86_64:

    CFA     = rsp + cfa_offset | rbp + cfa_offset | a PLT stub's CFA | (no rule)
    caller's rip = [CFA - 8]       (the x86_64 ABI; other return address rules are refused)
    caller's rsp = CFA
    caller's rbp = [CFA + rbp_offset] when rbp_offset != 0, else rbp itself

Row pcs are relative to the table's `base` (an ELF virtual address) so they fit in 32
bits. Between two FDEs, a NONE row marks the gap: the walker falls back to frame pointers
there. Parsing uses pyelftools' decoded CFI tables; everything after that is pure.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import IO, Any, NamedTuple

from elftools.dwarf.callframe import FDE, CFARule, RegisterRule
from elftools.dwarf.constants import DW_CFA
from elftools.elf.elffile import ELFFile

from agent.symbolize.elf import LoadSegment

RSP, RBP, RIP = 7, 6, 16  # DWARF register numbers on x86_64
ROW_FORMAT = struct.Struct("<IBbh")  # struct unwind_row in bpf/profile.bpf.c
ROW_SIZE = ROW_FORMAT.size
MAX_TABLE_SPAN = 1 << 32  # row pcs are u32 offsets from the base
PADDING_GAP = 16  # a smaller gap between two FDEs is alignment padding: no NONE row
S16 = (-(1 << 15), (1 << 15) - 1)
S8 = (-(1 << 7), (1 << 7) - 1)

# DW_CFA_def_cfa_expression that binutils writes for PLT stubs:
#   rsp + 8 + (((rip & 15) >= N) << 3), N being a DW_OP_lit.
_PLT_PREFIX = (0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A)  # breg7 8; breg16 0; lit15; and
_PLT_SUFFIX = (0x2A, 0x33, 0x24, 0x22)  # ge; lit3; shl; plus
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


def pack_row(row: UnwindRow) -> bytes:
    return ROW_FORMAT.pack(row.pc, int(row.kind), row.rbp_offset // 8, row.cfa_offset)


def plt_threshold(expression: Sequence[int]) -> int | None:
    """N of binutils' PLT CFA expression, or None for any other expression."""
    expr = tuple(expression)
    if len(expr) != len(_PLT_PREFIX) + 1 + len(_PLT_SUFFIX):
        return None
    if expr[: len(_PLT_PREFIX)] != _PLT_PREFIX or expr[len(_PLT_PREFIX) + 1 :] != _PLT_SUFFIX:
        return None
    literal = expr[len(_PLT_PREFIX)]
    return literal - _DW_OP_LIT0 if _DW_OP_LIT0 <= literal <= _DW_OP_LIT31 else None


def cfa_rule(cfa: CFARule) -> tuple[CfaKind, int]:
    if cfa.expr is not None:
        threshold = plt_threshold(cfa.expr)
        return (CfaKind.PLT, threshold) if threshold is not None else (CfaKind.UNSUPPORTED, 0)
    offset = cfa.offset or 0
    if cfa.reg not in (RSP, RBP) or not S16[0] <= offset <= S16[1]:
        return CfaKind.UNSUPPORTED, 0
    return (CfaKind.RSP if cfa.reg == RSP else CfaKind.RBP), offset


def rbp_rule(rule: RegisterRule | None) -> int:
    """Where rbp is saved (bytes from the CFA), 0 when unchanged or not representable."""
    if rule is None or rule.type != RegisterRule.OFFSET or not isinstance(rule.arg, int):
        return 0
    offset = rule.arg
    if offset % 8 or not S8[0] <= offset // 8 <= S8[1]:
        return 0
    return offset


def row_of_line(line: dict[Any, Any], pc: int) -> UnwindRow:
    """One row of pyelftools' decoded table, as the walker can follow it."""
    ra = line.get(RIP)
    if isinstance(ra, RegisterRule) and ra.type == RegisterRule.UNDEFINED:
        return UnwindRow(pc, CfaKind.END)
    kind, offset = cfa_rule(line["cfa"])
    standard_ra = isinstance(ra, RegisterRule) and ra.type == RegisterRule.OFFSET and ra.arg == -8
    if not standard_ra:
        return UnwindRow(pc, CfaKind.UNSUPPORTED)
    if kind == CfaKind.UNSUPPORTED:
        return UnwindRow(pc, kind)
    return UnwindRow(pc, kind, offset, rbp_rule(line.get(RBP)))


class FdeRows(NamedTuple):
    start: int  # ELF vaddrs
    end: int
    rows: list[UnwindRow]  # absolute pcs (vaddrs), within [start, end)


def fde_rows(lines: Iterable[dict[Any, Any]], start: int, end: int) -> FdeRows:
    rows = [row_of_line(line, int(line["pc"])) for line in lines]
    return FdeRows(start, end, [row for row in rows if start <= row.pc < end])


def merge_fdes(fdes: Iterable[FdeRows]) -> UnwindTable:
    """One sorted table from many FDEs: gaps become NONE rows, equal neighbours merge.

    FDEs are taken in order; an FDE that overlaps one taken before is dropped, so the
    caller lists the preferred source (.eh_frame) first.
    """
    taken: list[FdeRows] = []
    covered: list[tuple[int, int]] = []
    for fde in sorted(fdes, key=lambda f: f.start):
        if fde.end <= fde.start or not fde.rows:
            continue
        if covered and fde.start < covered[-1][1]:
            continue  # overlaps the previous FDE
        taken.append(fde)
        covered.append((fde.start, fde.end))
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
    """Drop rows that start where the next begins, and rows that repeat their predecessor."""
    by_pc: dict[int, UnwindRow] = {}
    for row in rows:
        by_pc[row.pc] = row  # the last rule at a pc wins
    out: list[UnwindRow] = []
    for pc in sorted(by_pc):
        row = by_pc[pc]
        if out and out[-1].rule() == row.rule():
            continue
        out.append(row)
    return out


def read_unwind_table(stream: IO[bytes]) -> UnwindTable:
    """The unwind table of an x86_64 ELF file (.eh_frame first, then .debug_frame).

    Raises UnwindTableError when there is none or the file is malformed.
    """
    try:
        elf = ELFFile(stream)
        if elf["e_machine"] != "EM_X86_64":
            raise UnwindTableError(f"unsupported machine {elf['e_machine']}")
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        entries: list[Any] = []
        if dwarf.has_EH_CFI():
            entries += dwarf.EH_CFI_entries()
        if dwarf.has_CFI():
            entries += dwarf.CFI_entries()
        table = merge_fdes(_fde_rows(entry) for entry in entries if isinstance(entry, FDE))
        return replace(table, loads=_loads(elf))
    except UnwindTableError:
        raise
    except OSError:
        raise
    except Exception as exc:  # pyelftools raises many types on malformed input
        raise UnwindTableError(f"{type(exc).__name__}: {exc}") from exc


def _fde_rows(fde: FDE) -> FdeRows:
    # pyelftools 0.33 cannot decode DW_CFA_GNU_args_size (it only concerns the
    # arguments area of the stack, never the CFA): leave it out before decoding.
    fde.instructions = [i for i in fde.instructions if i.opcode != DW_CFA.GNU_args_size]
    start = int(fde["initial_location"])
    end = start + int(fde["address_range"])
    return fde_rows(fde.get_decoded().table, start, end)


def _loads(elf: ELFFile) -> tuple[LoadSegment, ...]:
    return tuple(
        LoadSegment(h.p_offset, h.p_vaddr, h.p_filesz, h.p_memsz, h.p_flags)
        for h in (segment.header for segment in elf.iter_segments())
        if h.p_type == "PT_LOAD"
    )
