"""Compact unwind tables from a binary's call frame information (.eh_frame, .debug_frame).

A table is a sorted list of rows; a row holds from its `pc` up to the next row's pc and
says how the BPF walker (bpf/profile.bpf.c) gets from a frame to its caller on x86_64:

    CFA     = rsp + cfa_offset | rbp + cfa_offset | a PLT stub's CFA | (no rule)
    caller's rip = [CFA - 8]       (the x86_64 ABI; other return address rules are refused)
    caller's rsp = CFA
    caller's rbp = [CFA + rbp_offset] when rbp_offset != 0, else rbp itself

Row pcs are relative to the table's `base` (an ELF virtual address) so they fit in 32
bits. Between two FDEs, a NONE row marks the gap: the walker falls back to frame pointers
there. The CFI itself is parsed by agent.unwind.cfi; rows are packed as they are made,
so a table costs its BPF size (8 bytes a row) in memory, not a Python object per row.
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

from agent.elf.reader import LoadSegment
from agent.unwind.cfi import OFFSET, UNDEFINED, CfiError, FrameRules, fde_rules, index_fdes

RSP, RBP = 7, 6  # DWARF register numbers on x86_64
ROW_FORMAT = struct.Struct("<IBbh")  # struct unwind_row in bpf/profile.bpf.c
ROW_SIZE = ROW_FORMAT.size
MAX_TABLE_SPAN = 1 << 32  # row pcs are u32 offsets from the base
FRAME_POINTER_SHARE = 0.1  # of rows rbp-based: see UnwindTable.has_frame_pointers
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
    packed: bytes  # the rows as the BPF program reads them (ROW_SIZE bytes each)
    loads: tuple[LoadSegment, ...] = ()  # to translate runtime addresses into vaddrs

    def __len__(self) -> int:
        return len(self.packed) // ROW_SIZE

    def has_frame_pointers(self) -> bool:
        """Whether the code keeps frame pointers: its bodies' CFA follows rbp.

        Measured: a quarter to a third of the rows of binaries built with frame
        pointers (perf, node, libjvm, -fno-omit-frame-pointer) are rbp-based; under 1%
        of those built without (Debian's python3.11, libc, libclang-cpp, pyenv's libpython).
        """
        kinds = [fields[1] for fields in ROW_FORMAT.iter_unpack(self.packed)]
        rbp, rsp = kinds.count(CfaKind.RBP), kinds.count(CfaKind.RSP)
        return rbp >= FRAME_POINTER_SHARE * (rbp + rsp) > 0

    @property
    def rows(self) -> tuple[UnwindRow, ...]:
        """The rows decoded (for tests and tools; the agent only ships `packed`)."""
        return tuple(unpack_row(fields) for fields in ROW_FORMAT.iter_unpack(self.packed))

    def row_for(self, vaddr: int) -> UnwindRow | None:
        """The row covering an ELF virtual address (as the BPF search finds it)."""
        rows = self.rows
        index = bisect.bisect_right(rows, vaddr - self.base, key=lambda row: row.pc)
        return rows[index - 1] if index > 0 else None


class FdeRows(NamedTuple):
    start: int  # ELF vaddrs
    end: int
    rows: list[UnwindRow]  # absolute pcs (vaddrs), within [start, end)


def pack_row(row: UnwindRow) -> bytes:
    return ROW_FORMAT.pack(row.pc, int(row.kind), row.rbp_offset // 8, row.cfa_offset)


def unpack_row(fields: tuple[int, ...]) -> UnwindRow:
    pc, kind, rbp_slots, cfa_offset = fields
    return UnwindRow(pc, CfaKind(kind), cfa_offset, rbp_slots * 8)


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


class TableBuilder:
    """Packs FDEs, given in ascending start order, into one table as they come.

    Streaming keeps memory at the packed size (8 bytes a row) even for binaries with a
    million rows. An FDE that overlaps the previous one is dropped; a gap of at least
    PADDING_GAP bytes after an FDE gets a NONE row; a row at the pc of the previous one
    replaces it; a row with the previous row's rule is not repeated.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self._base: int | None = None
        self._end = 0  # end of the last FDE taken (vaddr)
        self._last: tuple[int, tuple[CfaKind, int, int]] | None = None  # (pc, rule)

    def add(self, start: int, end: int, rows: Iterable[UnwindRow]) -> bool:
        """Append one FDE (rows with vaddr pcs); False when it was dropped."""
        if end <= start or (self._base is not None and start < self._end):
            return False
        base = start if self._base is None else self._base
        if end - base > MAX_TABLE_SPAN:
            return False
        rows = [row for row in rows if start <= row.pc < end]
        if not rows:
            return False
        if self._base is not None and start - self._end >= PADDING_GAP:
            self._emit(self._end - base, (CfaKind.NONE, 0, 0))
        self._base = base
        for row in rows:
            self._emit(row.pc - base, row.rule())
        self._end = end
        return True

    def finish(self, loads: tuple[LoadSegment, ...] = ()) -> UnwindTable:
        if self._base is None:
            raise UnwindTableError("no frame description entries")
        self._emit(self._end - self._base, (CfaKind.NONE, 0, 0))
        return UnwindTable(self._base, bytes(self._out), loads)

    def _emit(self, pc: int, rule: tuple[CfaKind, int, int]) -> None:
        if self._last is not None:
            last_pc, last_rule = self._last
            if pc < last_pc:
                return  # rows out of order: keep the first account
            if pc == last_pc:  # the later rule at a pc wins
                del self._out[-ROW_SIZE:]
                before = self._previous_rule()
                if before == rule:  # ... and may now repeat the row before it
                    self._last = (self._previous_pc(), rule)
                    return
            elif rule == last_rule:
                return
        self._out += ROW_FORMAT.pack(pc, int(rule[0]), rule[2] // 8, rule[1])
        self._last = (pc, rule)

    def _previous_rule(self) -> tuple[CfaKind, int, int] | None:
        if not self._out:
            return None
        return unpack_row(ROW_FORMAT.unpack_from(self._out, len(self._out) - ROW_SIZE)).rule()

    def _previous_pc(self) -> int:
        return int(ROW_FORMAT.unpack_from(self._out, len(self._out) - ROW_SIZE)[0])


def merge_fdes(fdes: Iterable[FdeRows]) -> UnwindTable:
    """One table from FDEs in any order; among FDEs with the same start the first wins."""
    builder = TableBuilder()
    for fde in sorted(fdes, key=lambda f: f.start):  # stable: listing order among equals
        builder.add(fde.start, fde.end, fde.rows)
    return builder.finish()


def read_unwind_table(stream: IO[bytes]) -> UnwindTable:
    """The unwind table of an x86_64 ELF file (.eh_frame first, then .debug_frame).

    Raises UnwindTableError when there is none or the file is malformed; OSError when
    it cannot be read.
    """
    try:
        elf = ELFFile(stream)
        if elf["e_machine"] != "EM_X86_64":
            raise UnwindTableError(f"unsupported machine {elf['e_machine']}")
        sections = []
        for name, eh_frame in ((".eh_frame", True), (".debug_frame", False)):
            section = elf.get_section_by_name(name)
            if section is not None and section["sh_type"] != "SHT_NOBITS":
                data, address = section.data(), section["sh_addr"]
                sections.append((data, address, index_fdes(data, address, eh_frame)))
        # Ascending start; .eh_frame first among equal starts (sort is stable).
        order = sorted(
            ((fde.start, rank, fde) for rank, (_, _, fdes) in enumerate(sections) for fde in fdes),
            key=lambda item: (item[0], item[1]),
        )
        builder = TableBuilder()
        for _, rank, fde in order:
            data, address, _ = sections[rank]
            try:
                rules = fde_rules(data, fde, address)
            except CfiError:
                continue  # this function falls back to frame pointers
            builder.add(fde.start, fde.end, fde_rows(rules, fde.start, fde.end).rows)
        loads = tuple(
            LoadSegment(h.p_offset, h.p_vaddr, h.p_filesz, h.p_memsz, h.p_flags)
            for h in (segment.header for segment in elf.iter_segments())
            if h.p_type == "PT_LOAD"
        )
        return builder.finish(loads)
    except (UnwindTableError, OSError):
        raise
    except Exception as exc:  # pyelftools raises many types on malformed ELF
        raise UnwindTableError(f"{type(exc).__name__}: {exc}") from exc
