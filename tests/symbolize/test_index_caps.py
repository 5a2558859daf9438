"""Hostile and enormous binaries: the indexing child is capped in memory and time, a
crafted ELF is rejected before anything big is read; nothing crashes, each failure is
counted in strobe_binary_errors{reason}, and the frame keeps its address (and its ELF
name when the ELF part was fine)."""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.elf.reader import ElfInfo, ElfReadError, read_build_id
from agent.metrics import BINARY_ERRORS
from agent.model import Mapping, ProcessInfo
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.symcache_child import IndexLimits
from tests.conftest import metric_value, require_tool
from tests.symbolize.helpers import (
    DATA,
    addr2line,
    compile_c,
    loader_mappings,
    runtime_address,
    symbol_vaddr,
)

BASE = 0x7F7800000000
SMALL_MEMORY = 64 << 20  # the interpreter and a small index fit; the generated DWARF does not


def errors(reason: str) -> float:
    return metric_value(BINARY_ERRORS, reason=reason)


def loaded(binary: Path) -> ProcessInfo:
    return ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, BASE))


def first_frame(symbolizer: Symbolizer, binary: Path, function: str) -> tuple[str, int]:
    process = loaded(binary)
    address = runtime_address(binary, symbol_vaddr(binary, function) + 4, process.mappings)
    (location,) = symbolizer.symbolize(process, (address,), ())
    assert location.address == address
    return (location.frames[0].function, location.frames[0].line) if location.frames else ("", 0)


@pytest.fixture(scope="module")
def enormous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary whose DWARF (4,000 functions x 25 lines) needs ~100 MB to index."""
    out = tmp_path_factory.mktemp("enormous")
    lines = []
    for i in range(4000):
        body = "\n".join(f"  s += x * {j} + {i};" for j in range(25))
        lines.append(f"int f{i}(int x) {{\n  int s = 0;\n{body}\n  return s;\n}}\n")
    lines.append("int main(int argc, char **argv) { return f0(argc); }\n")
    source = out / "enormous.c"
    source.write_text("".join(lines))
    return compile_c([source], out / "enormous", "-O0", "-g", compiler=require_tool("gcc"))


def test_memory_cap_stops_an_enormous_index(enormous: Path, tmp_path: Path) -> None:
    limits = IndexLimits(max_memory_bytes=SMALL_MEMORY)
    small = compile_c([DATA / "inline.c"], tmp_path / "small", "-O2", "-g", compiler="gcc")
    capped = Symbolizer(cache_dir=tmp_path / "cache", index_limits=limits)
    assert capped.prepare(loaded(small)) == 1  # the cap leaves room for ordinary work
    before = errors("index_memory")
    assert capped.prepare(loaded(enormous)) == 0
    assert errors("index_memory") == before + 1
    assert capped.stats.reasons == {"index_memory": 1}
    assert first_frame(capped, enormous, "f1234") == ("f1234", 0)  # ELF name, no line
    # Recorded on disk: neither this agent nor the next one retries it at once.
    assert capped.prepare(loaded(enormous)) == 0
    restarted = Symbolizer(cache_dir=tmp_path / "cache", index_limits=limits)
    assert restarted.prepare(loaded(enormous)) == 0
    assert errors("index_memory") == before + 1
    # Under the default cap the same binary indexes fine.
    free = Symbolizer(cache_dir=tmp_path / "other")
    assert free.prepare(loaded(enormous)) == 1
    name, line = first_frame(free, enormous, "f1234")
    assert name == "f1234" and line > 0


def test_time_cap_kills_the_indexing_child(enormous: Path, tmp_path: Path) -> None:
    # A millisecond is less than the child needs to start: it is killed for sure.
    symbolizer = Symbolizer(cache_dir=tmp_path, index_limits=IndexLimits(timeout_seconds=0.001))
    before = errors("index_timeout")
    assert symbolizer.prepare(loaded(enormous)) == 0
    assert errors("index_timeout") == before + 1
    assert first_frame(symbolizer, enormous, "f77") == ("f77", 0)
    assert not list(tmp_path.glob("symbols/*.tmp-*"))  # the half-written file is gone


@pytest.mark.parametrize("section", [".debug_info", ".debug_line", ".debug_abbrev"])
def test_corrupt_dwarf_is_a_counted_failure(c_binaries: Path, tmp_path: Path, section: str) -> None:
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "corrupt"))
    offset, size = section_extent(binary, section)
    with open(binary, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(section).randbytes(size))
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache")
    before = errors("dwarf")
    assert symbolizer.prepare(loaded(binary)) == 0
    assert errors("dwarf") == before + 1
    assert first_frame(symbolizer, binary, "inner_spin") == ("inner_spin", 0)


def test_compressed_debug_sections(tmp_path: Path) -> None:
    require_tool("addr2line")
    binary = compile_c(
        [DATA / "inline.c"], tmp_path / "gz", "-O2", "-g", "-gz=zlib", compiler=require_tool("gcc")
    )
    with open(binary, "rb") as f:
        info = ELFFile(f).get_section_by_name(".debug_info")
        assert info is not None and info["sh_flags"] & 0x800  # SHF_COMPRESSED: the case under test
    process = loaded(binary)
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache")
    assert symbolizer.prepare(process) == 1
    vaddr = symbol_vaddr(binary, "top")
    (location,) = symbolizer.symbolize(
        process, (runtime_address(binary, vaddr, process.mappings),), ()
    )
    assert [(f.function, f.file, f.line) for f in location.frames] == addr2line(binary, vaddr)


# --- crafted ELF headers ---------------------------------------------------------


def section_extent(path: Path, name: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(name)
        assert section is not None, name
        return int(section["sh_offset"]), int(section["sh_size"])


def section_header_offset(path: Path, name: str) -> int:
    """File offset of a section's header (64-bit little-endian ELF)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for index, section in enumerate(elf.iter_sections()):
            if section.name == name:
                return int(elf["e_shoff"]) + index * int(elf["e_shentsize"])
    raise KeyError(name)


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<" + fmt, *values))


E_PHNUM, E_SHNUM, E_SHOFF = 0x38, 0x3C, 0x28
SH_OFFSET, SH_SIZE, SH_INFO = 0x18, 0x20, 0x2C


def crafted(source: Path, target: Path, how: str) -> Path:
    """A copy of source with one hostile header change."""
    shutil.copy(source, target)
    if how == "symtab_size":  # a symbol table "larger" than the disk
        patch(target, section_header_offset(target, ".symtab") + SH_SIZE, "Q", 1 << 40)
    elif how == "symtab_offset":
        patch(target, section_header_offset(target, ".symtab") + SH_OFFSET, "Q", 1 << 50)
    elif how == "section_count":  # extended numbering: 2^31 section headers
        patch(target, E_SHNUM, "H", 0)
        with open(target, "rb") as f:
            shoff = ELFFile(f)["e_shoff"]
        patch(target, shoff + SH_SIZE, "Q", 1 << 31)
    elif how == "section_table":  # the table itself beyond the end of the file
        patch(target, E_SHOFF, "Q", 1 << 45)
    elif how == "symtab_bomb":  # 256 MiB of zeros, zlib-compressed into .symtab (~260 KB)
        blob = zlib.compress(bytes(256 << 20), 6)
        offset = target.stat().st_size
        with open(target, "ab") as f:
            f.write(struct.pack("<IIQQ", 1, 0, 256 << 20, 8) + blob)  # ELFCOMPRESS_ZLIB
        header = section_header_offset(target, ".symtab")
        with open(target, "rb") as f:
            f.seek(header + 8)
            (flags,) = struct.unpack("<Q", f.read(8))
        patch(target, header + 8, "Q", flags | 0x800)  # SHF_COMPRESSED
        patch(target, header + SH_OFFSET, "QQ", offset, 24 + len(blob))
    elif how == "segment_count":  # PN_XNUM with 4 billion program headers
        patch(target, E_PHNUM, "H", 0xFFFF)
        with open(target, "rb") as f:
            shoff = ELFFile(f)["e_shoff"]
        patch(target, shoff + SH_INFO, "I", 0xFFFFFFFF)
    return target


@pytest.mark.parametrize(
    "how",
    [
        "symtab_size",
        "symtab_offset",
        "section_count",
        "section_table",
        "segment_count",
        "symtab_bomb",
    ],
)
def test_crafted_headers_are_rejected_up_front(c_binaries: Path, tmp_path: Path, how: str) -> None:
    path = crafted(c_binaries / "spin_pie", tmp_path / how, how)
    with pytest.raises(ElfReadError):
        ElfInfo.read(str(path))
    assert read_build_id(str(path)) == ""  # the cheap path says "no build id", no exception
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    mapping = Mapping(BASE, BASE + 0x10000, 0x1000, str(path), dev, st.st_ino, "r-xp")
    process = ProcessInfo(0, 0, "bad", str(path), (mapping,))
    before = errors("malformed")
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache")
    (location,) = symbolizer.symbolize(process, (BASE + 0x1234,), ())
    assert location.frames == () and location.address == BASE + 0x1234
    assert location.mapping == mapping
    assert errors("malformed") == before + 1
    assert symbolizer.prepare(process) == 0


def test_overlapping_segments_still_name_frames(c_binaries: Path, tmp_path: Path) -> None:
    """Every program header turned into a PT_LOAD covering the whole file: odd but harmless."""
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "overlap"))
    original = loaded(c_binaries / "spin_pie")  # the loader's view of the honest layout
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        phoff, phentsize = elf["e_phoff"], elf["e_phentsize"]
        segments = [s.header for s in elf.iter_segments()]
    size = binary.stat().st_size
    for index, header in enumerate(segments):
        if header.p_type in ("PT_LOAD", "PT_PHDR", "PT_INTERP", "PT_DYNAMIC"):
            continue
        # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        patch(binary, phoff + index * phentsize, "IIQQQQQQ", 1, 5, 0, 0, 0, size, size, 4096)
    info = ElfInfo.read(str(binary))
    assert len(info.loads) > 4  # overlapping loads were read
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache")
    inode = binary.stat().st_ino
    mappings = tuple(
        Mapping(m.start, m.end, m.offset, str(binary), m.dev, inode, m.perms)
        for m in original.mappings
    )
    process = ProcessInfo(0, 0, "t", str(binary), mappings)
    vaddr = symbol_vaddr(binary, "inner_spin") + 4
    address = runtime_address(c_binaries / "spin_pie", vaddr, original.mappings)
    (location,) = symbolizer.symbolize(process, (address,), ())
    assert location.frames[0].function == "inner_spin"
