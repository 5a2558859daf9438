"""Unwind tables from real binaries, checked against readelf and pyelftools (no root)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from elftools.dwarf.callframe import FDE, RegisterRule
from elftools.dwarf.constants import DW_CFA
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.unwind.cfi import OFFSET, OTHER, SAME, UNDEFINED, FrameRules, iter_fdes
from agent.unwind.table import (
    ROW_SIZE,
    CfaKind,
    FdeRows,
    UnwindRow,
    UnwindTable,
    UnwindTableError,
    fde_rows,
    merge_fdes,
    pack_row,
    plt_threshold,
    read_unwind_table,
    rule_of,
)
from tests.conftest import REPO, require_tool

SOURCE = REPO / "tests" / "data" / "c" / "deep_nofp.c"
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
BINUTILS_PLT_EXPR = bytes((0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A, 0x3B, 0x2A, 0x33, 0x24, 0x22))
STANDARD = FrameRules(7, 8, b"", (SAME, 0), (OFFSET, -8))


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unwind workload three ways: no frame pointer, frame pointer, .debug_frame only."""
    gcc = require_tool("gcc")
    out = tmp_path_factory.mktemp("unwind")
    builds = {
        "nofp": ["-O2", "-fomit-frame-pointer"],
        "fp": ["-O0", "-fno-omit-frame-pointer"],
        "debug_frame": ["-O2", "-g", "-fno-asynchronous-unwind-tables", "-fno-omit-frame-pointer"],
    }
    for name, flags in builds.items():
        subprocess.run([gcc, *flags, "-o", str(out / name), str(SOURCE)], check=True)
    return {name: out / name for name in builds}


def section_bytes(elf: ELFFile, name: str) -> tuple[bytes, int]:
    section = elf.get_section_by_name(name)
    assert section is not None, name
    return section.data(), section["sh_addr"]


def read_table(path: Path) -> UnwindTable:
    with path.open("rb") as f:
        return read_unwind_table(f)


# --- readelf's view --------------------------------------------------------------------


def readelf_rows(path: Path) -> list[tuple[int, int, int, str, str, str]]:
    """(fde start, fde end, loc, cfa, rbp, ra) of every row readelf interprets.

    An FDE without instructions prints no rows: its one row is its CIE's last one.
    """
    readelf = require_tool("readelf")
    text = subprocess.run(
        [readelf, "--debug-dump=frames-interp", str(path)], capture_output=True, text=True
    ).stdout
    rows = []
    cie_rows: dict[str, tuple[list[str], list[str]]] = {}
    current: tuple[int, int] | None = None
    header: list[str] = []
    cie_offset = ""
    for line in text.splitlines():
        if m := re.match(r"([0-9a-f]+) [0-9a-f]+ [0-9a-f]+ CIE", line):
            current, cie_offset = None, m.group(1)
        elif m := re.search(r"FDE cie=([0-9a-f]+) pc=([0-9a-f]+)\.\.([0-9a-f]+)", line):
            current = (int(m.group(2), 16), int(m.group(3), 16))
            if m.group(1) in cie_rows:  # the CIE's row, unless the FDE prints its own
                head, values = cie_rows[m.group(1)]
                rows.append(_readelf_row(current, current[0], head, values))
        elif line.strip().startswith("LOC"):
            header = line.split()
        elif re.match(r"[0-9a-f]{16} ", line):
            values = line.split()
            if current is None:
                cie_rows[cie_offset] = (header, values)
            else:
                if (
                    rows
                    and rows[-1][:3] == (*current, current[0])
                    and values[0] == f"{current[0]:016x}"
                ):
                    rows.pop()  # the FDE restates its first row
                rows.append(_readelf_row(current, int(values[0], 16), header, values))
    return rows


def _readelf_row(fde: tuple[int, int], loc: int, header: list[str], values: list[str]) -> tuple:
    column = dict(zip(header[1:], values[1:], strict=False))
    return (*fde, loc, column.get("CFA", ""), column.get("rbp", "u"), column.get("ra", "u"))


def expected_rule(cfa: str, rbp: str, ra: str) -> tuple[CfaKind, int, int] | None:
    """What the walker should do by readelf; None for a CFA expression (PLT or not)."""
    if ra == "u":
        return (CfaKind.END, 0, 0)
    assert ra == "c-8", ra
    if cfa == "exp":
        return None
    m = re.fullmatch(r"(rsp|rbp)\+(\d+)", cfa)
    assert m, cfa
    kind = CfaKind.RSP if m.group(1) == "rsp" else CfaKind.RBP
    rbp_offset = int(rbp[1:]) if rbp.startswith("c") else 0
    return (kind, int(m.group(2)), rbp_offset)


@pytest.mark.parametrize("name", ["nofp", "fp", "debug_frame"])
def test_rows_match_readelf_frames_interp(binaries: dict[str, Path], name: str) -> None:
    table = read_table(binaries[name])
    rows = readelf_rows(binaries[name])
    assert len(rows) > 10
    for start, end, loc, cfa, rbp, ra in rows:
        if start == end:
            continue
        row = table.row_for(loc)
        assert row is not None, hex(loc)
        want = expected_rule(cfa, rbp, ra)
        if want is None:
            assert row.kind in (CfaKind.PLT, CfaKind.UNSUPPORTED)
        else:
            assert row.rule() == want, (hex(loc), cfa, rbp, ra, row)


def test_no_frame_pointer_build_has_rsp_rows_and_an_outermost_frame(
    binaries: dict[str, Path],
) -> None:
    table = read_table(binaries["nofp"])
    kinds = {row.kind for row in table.rows}
    assert {CfaKind.RSP, CfaKind.END} <= kinds
    assert CfaKind.RBP not in kinds  # nothing uses rbp for the CFA without frame pointers
    # Each level's frame is a different size: several distinct rsp offsets.
    assert len({row.cfa_offset for row in table.rows if row.kind == CfaKind.RSP}) >= 5


def test_frame_pointer_build_saves_rbp(binaries: dict[str, Path]) -> None:
    table = read_table(binaries["fp"])
    assert any(row.kind == CfaKind.RBP and row.rbp_offset == -16 for row in table.rows)


def test_debug_frame_only_functions_are_covered(binaries: dict[str, Path]) -> None:
    path = binaries["debug_frame"]
    with path.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        symbols = {s.name: s["st_value"] for s in symtab.iter_symbols()}
        data, address = section_bytes(elf, ".eh_frame")
        eh_starts = {fde.start for fde in iter_fdes(data, address, True)}
    assert symbols["level_3"] not in eh_starts  # only .debug_frame describes our functions
    row = read_table(path).row_for(symbols["level_3"] + 1)
    assert row is not None and row.kind == CfaKind.RSP and row.cfa_offset == 16


def test_gaps_between_fdes_are_none_rows(binaries: dict[str, Path]) -> None:
    table = read_table(binaries["nofp"])
    last = table.rows[-1]
    assert last.kind == CfaKind.NONE  # after the last FDE
    assert table.row_for(table.base - 1) is None  # before the first


# --- pyelftools' view -----------------------------------------------------------------


def pyelftools_table(path: Path) -> UnwindTable:
    """The same table built from pyelftools' decoded CFI (the slow reference)."""
    fdes = []
    with path.open("rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        entries = list(dwarf.EH_CFI_entries()) if dwarf.has_EH_CFI() else []
        entries += list(dwarf.CFI_entries()) if dwarf.has_CFI() else []
        for entry in entries:
            if not isinstance(entry, FDE):
                continue
            entry.instructions = [i for i in entry.instructions if i.opcode != DW_CFA.GNU_args_size]
            start = entry["initial_location"]
            end = start + entry["address_range"]
            lines = entry.get_decoded().table
            fdes.append(fde_rows([(line["pc"], _rules(line)) for line in lines], start, end))
    return merge_fdes(fdes)


def _rules(line: dict) -> FrameRules:
    cfa = line["cfa"]
    if cfa.expr is not None:
        return FrameRules(-1, 0, bytes(cfa.expr), _rule(line.get(6)), _rule(line.get(16)))
    return FrameRules(cfa.reg, cfa.offset, b"", _rule(line.get(6)), _rule(line.get(16)))


def _rule(rule: RegisterRule | None) -> tuple[int, int]:
    if rule is None or rule.type == RegisterRule.SAME_VALUE:
        return (SAME, 0)
    if rule.type == RegisterRule.OFFSET and isinstance(rule.arg, int):
        return (OFFSET, rule.arg)
    if rule.type == RegisterRule.UNDEFINED:
        return (UNDEFINED, 0)
    return (OTHER, 0)


@pytest.mark.parametrize("name", ["nofp", "fp", "debug_frame"])
def test_parser_agrees_with_pyelftools_on_test_binaries(
    binaries: dict[str, Path], name: str
) -> None:
    assert read_table(binaries[name]).rows == pyelftools_table(binaries[name]).rows


def test_parser_agrees_with_pyelftools_on_libc() -> None:
    if not LIBC.exists():
        pytest.skip("no Debian x86_64 libc here")
    ours = read_table(LIBC)
    assert len(ours) > 10_000
    assert ours.rows == pyelftools_table(LIBC).rows
    assert {CfaKind.PLT, CfaKind.END} <= {row.kind for row in ours.rows}


# --- pure pieces ----------------------------------------------------------------------


def test_plt_expression_is_recognized_with_its_threshold() -> None:
    assert plt_threshold(BINUTILS_PLT_EXPR) == 11
    assert plt_threshold(BINUTILS_PLT_EXPR[:-1]) is None
    assert plt_threshold(bytes([0x77, 0x08])) is None


def test_rules_the_walker_cannot_follow_are_unsupported() -> None:
    assert rule_of(STANDARD) == (CfaKind.RSP, 8, 0)
    assert rule_of(STANDARD._replace(cfa_reg=6, rbp=(OFFSET, -16))) == (CfaKind.RBP, 8, -16)
    assert rule_of(STANDARD._replace(ra=(UNDEFINED, 0))) == (CfaKind.END, 0, 0)
    assert rule_of(STANDARD._replace(ra=(OFFSET, -16)))[0] == CfaKind.UNSUPPORTED
    assert rule_of(STANDARD._replace(cfa_reg=10))[0] == CfaKind.UNSUPPORTED  # r10-based CFA
    assert rule_of(STANDARD._replace(cfa_offset=1 << 20))[0] == CfaKind.UNSUPPORTED
    assert rule_of(STANDARD._replace(cfa_reg=-1, cfa_expr=b"\x77\x10"))[0] == CfaKind.UNSUPPORTED
    plt = rule_of(STANDARD._replace(cfa_reg=-1, cfa_expr=BINUTILS_PLT_EXPR))
    assert plt == (CfaKind.PLT, 11, 0)
    assert rule_of(STANDARD._replace(rbp=(OFFSET, -12)))[2] == 0  # not a multiple of 8
    assert rule_of(STANDARD._replace(rbp=(OTHER, 0)))[2] == 0


def test_merge_marks_gaps_drops_overlaps_and_merges_equal_neighbours() -> None:
    rsp8 = (CfaKind.RSP, 8, 0)
    a = FdeRows(0x1000, 0x1010, [UnwindRow(0x1000, *rsp8), UnwindRow(0x1004, CfaKind.RSP, 16)])
    b = FdeRows(0x1010, 0x1020, [UnwindRow(0x1010, *rsp8)])  # adjacent: no gap row
    overlapping = FdeRows(0x1018, 0x1030, [UnwindRow(0x1018, CfaKind.RBP, 16)])
    c = FdeRows(0x1100, 0x1120, [UnwindRow(0x1100, *rsp8)])  # after a real gap
    table = merge_fdes([c, overlapping, b, a])
    assert table.base == 0x1000
    assert table.rows == (
        UnwindRow(0x0, *rsp8),
        UnwindRow(0x4, CfaKind.RSP, 16),
        UnwindRow(0x10, *rsp8),
        UnwindRow(0x20, CfaKind.NONE),
        UnwindRow(0x100, *rsp8),
        UnwindRow(0x120, CfaKind.NONE),
    )
    assert table.row_for(0x1018) == UnwindRow(0x10, *rsp8)  # not the dropped overlap
    with pytest.raises(UnwindTableError):
        merge_fdes([])


def test_rows_pack_as_the_bpf_struct() -> None:
    packed = pack_row(UnwindRow(0x12345, CfaKind.RBP, 16, -16))
    assert len(packed) == ROW_SIZE == 8
    assert packed == bytes.fromhex("45230100") + bytes([2, 0xFE]) + (16).to_bytes(2, "little")


def test_malformed_files_raise_unwind_table_error(tmp_path: Path) -> None:
    not_elf = tmp_path / "not_elf"
    not_elf.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(UnwindTableError):
        read_table(not_elf)


@pytest.fixture(scope="module")
def eh_frame(binaries: dict[str, Path]) -> tuple[bytes, int]:
    with binaries["nofp"].open("rb") as f:
        return section_bytes(ELFFile(f), ".eh_frame")


def test_corrupt_eh_frame_keeps_the_entries_before_the_damage(
    eh_frame: tuple[bytes, int],
) -> None:
    data, address = eh_frame
    whole = list(iter_fdes(data, address, True))
    half = len(data) // 2
    damaged = list(iter_fdes(data[:half] + b"\xff" * (len(data) - half), address, True))
    assert 1 < len(damaged) < len(whole)
    # The entry that straddles the damage may decode to garbage rules; those before are intact.
    assert damaged[:-1] == whole[: len(damaged) - 1]


@settings(max_examples=300, deadline=None)
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_mutated_eh_frame_never_breaks_the_parser(
    eh_frame: tuple[bytes, int], mutations: list[tuple[int, int]]
) -> None:
    data, address = bytearray(eh_frame[0]), eh_frame[1]
    for position, value in mutations:
        data[position % len(data)] = value
    for fde in iter_fdes(bytes(data), address, True):  # raises nothing
        rows = fde_rows(fde.rows, fde.start, fde.end).rows
        assert all(fde.start <= row.pc < fde.end for row in rows)
