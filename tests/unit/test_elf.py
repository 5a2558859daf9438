"""ELF headers, symbols and the runtime -> ELF address translation."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from agent.elf.reader import ElfInfo, LoadSegment, SymbolTable, runtime_to_elf_vaddr
from agent.model import Mapping
from tests.conftest import require_tool
from tests.symbolize.helpers import symbol_range


def mapping(start: int, end: int, offset: int) -> Mapping:
    return Mapping(start=start, end=end, offset=offset, path="/x", dev="fe:00", inode=1)


# Program headers as gcc/ld lay them out (readelf -l of real binaries).
PIE_LOADS = (
    LoadSegment(0x0, 0x0, 0x628, 0x628, 4),
    LoadSegment(0x1000, 0x1000, 0x1F5, 0x1F5, 5),
    LoadSegment(0x2000, 0x2000, 0x10C, 0x10C, 4),
    LoadSegment(0x2DB0, 0x3DB0, 0x260, 0x268, 6),  # data: vaddr != offset
)
NOPIE_LOADS = (
    LoadSegment(0x0, 0x400000, 0x4F8, 0x4F8, 4),
    LoadSegment(0x1000, 0x401000, 0x1E5, 0x1E5, 5),
)
LIBC_LOADS = (
    LoadSegment(0x0, 0x0, 0x25388, 0x25388, 4),
    LoadSegment(0x26000, 0x26000, 0x1550FC, 0x1550FC, 5),
)


def test_pie_text_is_relocated_by_the_mapping_base() -> None:
    text = mapping(0x55D0C0001000, 0x55D0C0002000, 0x1000)
    assert runtime_to_elf_vaddr(0x55D0C0001139, text, PIE_LOADS) == 0x1139


def test_non_pie_runtime_address_is_the_vaddr() -> None:
    text = mapping(0x401000, 0x402000, 0x1000)
    assert runtime_to_elf_vaddr(0x401136, text, NOPIE_LOADS) == 0x401136


def test_shared_library_with_non_zero_offset() -> None:
    text = mapping(0x7F5583CFC000, 0x7F5583E52000, 0x26000)
    assert runtime_to_elf_vaddr(0x7F5583CFC000 + 0x1234, text, LIBC_LOADS) == 0x27234


def test_segment_whose_vaddr_differs_from_its_offset() -> None:
    data = mapping(0x55D0C0003000, 0x55D0C0005000, 0x2000)
    # runtime 0x55D0C0003DB8 -> file offset 0x2DB8 -> vaddr 0x3DB8
    assert runtime_to_elf_vaddr(0x55D0C0003DB8, data, PIE_LOADS) == 0x3DB8


def test_offset_outside_every_load_is_none() -> None:
    text = mapping(0x401000, 0x402000, 0x1000)
    assert runtime_to_elf_vaddr(0x401FF0, text, NOPIE_LOADS) is None  # past p_filesz
    assert runtime_to_elf_vaddr(0x401000, text, ()) is None


def test_symbol_table_honours_sizes_and_prefers_real_names() -> None:
    table = SymbolTable(
        [
            (0x100, 0x10, "first", True),
            (0x200, 0x20, "_local_alias", False),
            (0x200, 0x20, "exported", True),
            (0x300, 0, "asm_no_size", True),
        ]
    )
    assert table.lookup(0x0FF) is None
    assert table.lookup(0x100) == "first" and table.lookup(0x10F) == "first"
    assert table.lookup(0x110) is None  # gap after a sized function
    assert table.lookup(0x21F) == "exported"
    assert table.lookup(0x5000) == "asm_no_size"  # unsized: up to the next symbol
    assert len(table) == 3


def readelf(*args: str) -> str:
    return subprocess.run(
        ["readelf", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def readelf_loads(binary: Path) -> list[tuple[int, int, int, int]]:
    loads = []
    for line in readelf("-lW", str(binary)).splitlines():
        fields = line.split()
        if fields[:1] == ["LOAD"]:
            offset, vaddr, _, filesz, memsz = (int(x, 16) for x in fields[1:6])
            loads.append((offset, vaddr, filesz, memsz))
    return loads


@pytest.mark.parametrize(
    ("name", "is_dyn"), [("spin_pie", True), ("spin_nopie", False), ("libspin.so", True)]
)
def test_elf_info_agrees_with_readelf(c_binaries: Path, name: str, is_dyn: bool) -> None:
    require_tool("readelf")
    binary = c_binaries / name
    info = ElfInfo.read(str(binary))
    build_id = re.search(r"Build ID: ([0-9a-f]+)", readelf("-n", str(binary)))
    assert build_id is not None and info.build_id == build_id.group(1)
    assert info.is_dyn is is_dyn
    assert [(s.offset, s.vaddr, s.filesz, s.memsz) for s in info.loads] == readelf_loads(binary)
    assert info.has_dwarf and info.debuglink is None
    assert info.load_address == (0 if is_dyn else 0x400000)


def test_symbols_of_a_real_binary(c_binaries: Path) -> None:
    binary = c_binaries / "spin_pie"
    info = ElfInfo.read(str(binary))
    start, size = symbol_range(binary, "inner_spin")
    assert info.symbols.lookup(start) == "inner_spin"
    assert info.symbols.lookup(start + size - 1) == "inner_spin"
    assert info.symbols.lookup(start + size) != "inner_spin"
    assert info.symbols.lookup(symbol_range(binary, "main")[0]) == "main"


def test_debuglink_name_and_crc(c_binaries: Path, tmp_path: Path) -> None:
    objcopy = require_tool("objcopy")
    binary = shutil.copy(c_binaries / "spin_pie", tmp_path / "spin")
    debug = tmp_path / "spin.debug"
    subprocess.run([objcopy, "--only-keep-debug", binary, str(debug)], check=True)
    subprocess.run([objcopy, "--strip-debug", f"--add-gnu-debuglink={debug}", binary], check=True)
    info = ElfInfo.read(str(binary))
    assert info.debuglink is not None
    assert info.debuglink.name == "spin.debug"
    assert info.debuglink.crc == zlib.crc32(debug.read_bytes())
    assert not info.has_dwarf
    debug_info = ElfInfo.read(str(debug))
    assert debug_info.has_dwarf and debug_info.build_id == info.build_id
    assert debug_info.load_address == info.load_address
