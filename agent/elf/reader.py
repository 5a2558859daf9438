"""ELF headers, notes and function symbols (pyelftools), and address translation.

A runtime address becomes an ELF virtual address in two steps that hold for PIE,
non-PIE executables and shared libraries alike:
    file offset = address - mapping.start + mapping.offset
    ELF vaddr   = file offset - load.p_offset + load.p_vaddr   (the PT_LOAD holding it)
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from elftools.elf.elffile import ELFFile

from agent.elf.plt import plt_symbols
from agent.model import Mapping

STT_FUNC = 2
STT_GNU_IFUNC = 10
STB_GLOBAL = 1
SHN_UNDEF = 0
SHT_NOBITS = 8
# Caps against files built to exhaust memory: linked binaries and debug files have
# tens of sections and a handful of program headers.
MAX_SECTIONS = 8192
MAX_SEGMENTS = 1024
MAX_SYMBOLS = 4_000_000
SHF_COMPRESSED = 0x800
MAX_INFLATION = 64  # zlib of real tables stays far below; a bomb of zeros is ~1000x
MAX_NAMES_BYTES = 16 << 20
DEBUG_PREFIXES = (b".debug", b".zdebug")


class ElfReadError(Exception):
    """The file is not an ELF file we can read (truncated, corrupt, not ELF)."""


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD program header."""

    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class DebugLink:
    """Contents of .gnu_debuglink: the debug file's name and the CRC32 of its bytes."""

    name: str
    crc: int


def runtime_to_elf_vaddr(
    address: int, mapping: Mapping, loads: tuple[LoadSegment, ...]
) -> int | None:
    """The ELF virtual address of a runtime address inside `mapping`, or None.

    None when the file offset lies in no PT_LOAD's file-backed bytes.
    """
    file_offset = address - mapping.start + mapping.offset
    for load in loads:
        if load.offset <= file_offset < load.offset + load.filesz:
            return file_offset - load.offset + load.vaddr
    return None


RawSymbol = tuple[int, int, str, bool]  # value, size, name, is global
# Sections only Go's linker writes (the line table survives `-ldflags='-s -w'`).
GO_SECTION_NAMES = frozenset(
    (".gopclntab", ".data.rel.ro.gopclntab", ".note.go.buildid", ".go.buildinfo")
)


class FoundSymbols:
    """Function symbols as found, before one is chosen per address: their values, sizes
    and ranks in arrays and their names as references into the string tables they came
    from. No Python object per symbol: a large C++ binary (node: 79k functions) parsed
    into tuples and strings peaked at 90 MiB and left the agent 47 MiB bigger for 9 MiB
    of table, small objects from the parse pinning the allocator's arenas."""

    def __init__(self) -> None:
        self.values = array("Q")
        self.sizes = array("Q")
        self.ranks = array("B")  # (sized, global, no leading "_") as bits: best highest
        self.refs = array("Q")  # string table index << 32 | offset of the name
        self._extra = bytearray()  # names added one by one (PLT stubs, tests)
        self.tables: list[bytes | bytearray] = [self._extra]

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: int, size: int, name: str, is_global: bool) -> None:
        raw = name.encode("utf-8", "surrogateescape")
        if raw:
            self._append(value, size, is_global, raw[0], ref=len(self._extra))
            self._extra += raw + b"\0"

    def add_table(self, data: bytes, strings: bytes, elfclass: int, little_endian: bool) -> None:
        """The defined functions of one .symtab or .dynsym and its string table."""
        order = "<" if little_endian else ">"
        # Elf64_Sym: name, info, other, shndx, value, size; Elf32_Sym: name, value, size, ...
        layout = struct.Struct(order + ("IBBHQQ" if elfclass == 64 else "IIIBBH"))
        usable = len(data) - len(data) % layout.size
        table = len(self.tables) << 32
        self.tables.append(strings)
        wide = elfclass == 64
        for fields in layout.iter_unpack(data[:usable]):
            if wide:
                name_offset, info, _, shndx, value, size = fields
            else:
                name_offset, value, size, info, _, shndx = fields
            if info & 0xF not in (STT_FUNC, STT_GNU_IFUNC) or shndx == SHN_UNDEF or not value:
                continue
            if name_offset >= len(strings) or not strings[name_offset]:
                continue
            self._append(
                value, size, info >> 4 == STB_GLOBAL, strings[name_offset], table | name_offset
            )

    def _append(self, value: int, size: int, is_global: bool, first: int, ref: int) -> None:
        self.values.append(value)
        self.sizes.append(size)
        self.ranks.append((size > 0) << 2 | is_global << 1 | (first != 0x5F))  # 0x5F: "_"
        self.refs.append(ref)

    def name(self, index: int) -> bytes:
        ref = self.refs[index]
        table = self.tables[ref >> 32]
        start = ref & 0xFFFFFFFF
        end = table.find(b"\0", start)
        return bytes(table[start : end if end >= 0 else len(table)])


class SymbolTable:
    """Function symbols sorted by address; lookup by bisection, sizes honoured.

    Packed (addresses and sizes in arrays, names in one bytes blob): a host maps
    binaries with 100k+ long (C++, Rust) symbols, and a Python string and list slot
    per symbol would cost ~150 bytes each for every binary the agent keeps.
    """

    def __init__(self, symbols: FoundSymbols | Iterable[RawSymbol]) -> None:
        found = symbols if isinstance(symbols, FoundSymbols) else _found(symbols)
        values, sizes = found.values, found.sizes
        # One name per address: the best of aliases (sized, global, no leading "_"), the
        # first found of equals. A stable sort by (address, rank) puts it first among the
        # highest ranks, at the end of its address's run.
        order = sorted(range(len(found)), key=lambda i: values[i] << 3 | found.ranks[i])
        self._starts = array("Q")
        self._sizes = array("Q")
        self._name_ends = array("Q")
        names = bytearray()
        # The other names of a sized symbol (same start and size): few per binary.
        self._aliases: dict[int, tuple[str, ...]] = {}
        run_start = 0
        for position in range(1, len(order) + 1):
            if position < len(order) and values[order[position]] == values[order[run_start]]:
                continue
            run = order[run_start:position]
            best_rank = found.ranks[run[-1]]
            kept = next(i for i in run if found.ranks[i] == best_rank)
            kept_name = found.name(kept)
            self._starts.append(values[kept])
            self._sizes.append(sizes[kept])
            names += kept_name
            self._name_ends.append(len(names))
            if len(run) > 1:
                self._add_aliases(found, sorted(run), kept, kept_name)
            run_start = position
        self._names = bytes(names)

    def _add_aliases(
        self, found: FoundSymbols, run: list[int], kept: int, kept_name: bytes
    ) -> None:
        size = found.sizes[kept]
        if not size:
            return
        others: list[bytes] = []
        for index in run:  # in the order found
            name = found.name(index)
            if found.sizes[index] == size and name != kept_name and name not in others:
                others.append(name)
        if others:
            value = found.values[kept]
            self._aliases[value] = tuple(_decode(name) for name in others)

    def __len__(self) -> int:
        return len(self._starts)

    def lookup(self, vaddr: int) -> str | None:
        """Raw (mangled) name of the function containing vaddr, or None."""
        index = bisect.bisect_right(self._starts, vaddr) - 1
        if index < 0:
            return None
        size = self._sizes[index]
        if size and vaddr >= self._starts[index] + size:
            return None  # in a gap between functions
        return self._name(index)

    def covering(self, vaddr: int) -> tuple[str, ...]:
        """Names of the sized symbol whose range holds vaddr, best first; () if none."""
        index = bisect.bisect_right(self._starts, vaddr) - 1
        if index < 0:
            return ()
        start, size = self._starts[index], self._sizes[index]
        if not start <= vaddr < start + size:
            return ()
        return (self._name(index), *self._aliases.get(start, ()))

    def _name(self, index: int) -> str:
        start = self._name_ends[index - 1] if index else 0
        return _decode(self._names[start : self._name_ends[index]])


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")  # a symbol name is bytes, not always UTF-8


def _found(symbols: Iterable[RawSymbol]) -> FoundSymbols:
    found = FoundSymbols()
    for value, size, name, is_global in symbols:
        found.add(value, size, name, is_global)
    return found


@dataclass(frozen=True)
class ElfInfo:
    """What Strobe needs from one ELF file's headers."""

    build_id: str  # hex, "" when the file has no GNU build-id note
    is_dyn: bool  # ET_DYN: PIE executable or shared library
    loads: tuple[LoadSegment, ...]
    debuglink: DebugLink | None
    has_dwarf: bool  # carries .debug_info (possibly compressed)
    symbols: SymbolTable
    is_go: bool = False  # built by Go: names are in its line table (gopclntab.py)

    @property
    def load_address(self) -> int:
        """p_vaddr of the first PT_LOAD: what DWARF indexers take as image base."""
        return self.loads[0].vaddr if self.loads else 0

    @classmethod
    def read(cls, path: str) -> ElfInfo:
        """Read an ELF file; OSError when it cannot be opened, ElfReadError when malformed."""
        with open(path, "rb") as stream:
            return cls.from_stream(stream)

    @classmethod
    def from_stream(cls, stream: IO[bytes]) -> ElfInfo:
        """Parse an open ELF stream; raises ElfReadError on anything malformed."""
        try:
            check_layout(stream)
            elf = ELFFile(stream)
            return cls(
                build_id=_build_id(elf),
                is_dyn=elf["e_type"] == "ET_DYN",
                loads=_loads(elf),
                debuglink=_debuglink(elf),
                has_dwarf=_has_dwarf(elf),
                symbols=SymbolTable(_function_symbols(elf)),
                is_go=any(s.name in GO_SECTION_NAMES for s in elf.iter_sections()),
            )
        except OSError:
            raise
        except Exception as exc:  # pyelftools raises many types on corrupt input
            raise ElfReadError(f"{type(exc).__name__}: {exc}") from exc


def read_build_id(path: str) -> str:
    """Only the build id of a file (cheap: notes only); "" when none or unreadable."""
    try:
        with open(path, "rb") as stream:
            check_layout(stream)
            return _build_id(ELFFile(stream))
    except Exception:  # any unreadable or corrupt file simply has no usable build id
        return ""


_HEADER = {64: struct.Struct("HHIQQQIHHHHHH"), 32: struct.Struct("HHIIIIIHHHHHH")}
_SECTION = {64: struct.Struct("IIQQQQIIQQ"), 32: struct.Struct("IIIIIIIIII")}


def check_layout(stream: IO[bytes]) -> None:
    """Reject an ELF file whose headers point outside it or count absurdly many entries.

    pyelftools trusts sizes and counts; a crafted file would make it read gigabytes or
    loop for minutes. Raises ElfReadError; leaves the stream position at 0.
    """
    size = stream.seek(0, 2)
    stream.seek(0)
    ident = stream.read(16)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
        raise ElfReadError("not an ELF file")
    bits, order = (64 if ident[4] == 2 else 32), ("<" if ident[5] != 2 else ">")
    header = struct.Struct(order + _HEADER[bits].format)
    raw = stream.read(header.size)
    if len(raw) < header.size:
        raise ElfReadError("truncated ELF header")
    _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx = header.unpack(
        raw
    )
    sections = _section_headers(stream, size, bits, order, shoff, shentsize, shnum)
    if phnum == 0xFFFF and sections:  # PN_XNUM: the real count is in section 0's sh_info
        phnum = sections[0][7]
    if phnum > MAX_SEGMENTS or (phnum and phoff + phnum * phentsize > size):
        raise ElfReadError(f"program headers out of bounds ({phnum} at {phoff:#x})")
    for index, (_, sh_type, _, _, offset, length, *_rest) in enumerate(sections):
        if index and sh_type != SHT_NOBITS and length and offset + length > size:
            raise ElfReadError(f"section {index} ({length} bytes at {offset:#x}) past end of file")
    if any(section[2] & SHF_COMPRESSED for section in sections):
        _check_compressed(stream, sections, bits, order, shstrndx)
    stream.seek(0)


def _check_compressed(
    stream: IO[bytes], sections: list[tuple[int, ...]], bits: int, order: str, shstrndx: int
) -> None:
    """Refuse a compressed section we would inflate in process that claims to grow absurdly.

    pyelftools inflates a SHF_COMPRESSED section to whatever its header claims. Only
    DWARF sections are compressed in practice, and those are read by the indexing child
    (under its memory cap), never here.
    """
    if shstrndx == 0xFFFF and sections:  # SHN_XINDEX: the index is in section 0's sh_link
        shstrndx = sections[0][6]
    if not 0 < shstrndx < len(sections) or sections[shstrndx][2] & SHF_COMPRESSED:
        raise ElfReadError("compressed sections without a plain section name table")
    _, _, _, _, names_offset, names_size, *_ = sections[shstrndx]
    if names_size > MAX_NAMES_BYTES:
        raise ElfReadError(f"section name table of {names_size} bytes")
    stream.seek(names_offset)
    names = stream.read(names_size)
    chdr = struct.Struct(order + ("IIQQ" if bits == 64 else "III"))
    for name_offset, _, flags, _, offset, length, *_ in sections:
        end = names.find(b"\0", name_offset)
        if not flags & SHF_COMPRESSED or names[name_offset:end].startswith(DEBUG_PREFIXES):
            continue
        stream.seek(offset)
        raw = stream.read(chdr.size)
        if len(raw) < chdr.size:
            raise ElfReadError("truncated compression header")
        inflated = chdr.unpack(raw)[2 if bits == 64 else 1]
        if inflated > max(MAX_INFLATION * length, 1 << 20):
            raise ElfReadError(f"a {length}-byte compressed section claims {inflated} bytes")


def _section_headers(
    stream: IO[bytes], size: int, bits: int, order: str, shoff: int, entsize: int, count: int
) -> list[tuple[int, ...]]:
    if not shoff:
        return []
    layout = struct.Struct(order + _SECTION[bits].format)
    if entsize != layout.size or shoff + layout.size > size:
        raise ElfReadError(f"section header table out of bounds ({shoff:#x})")
    stream.seek(shoff)
    first = layout.unpack(stream.read(layout.size))
    if count == 0:  # SHN_LORESERVE or more sections: the count is in section 0's sh_size
        count = first[5]
    if count > MAX_SECTIONS or shoff + count * layout.size > size:
        raise ElfReadError(f"{count} section headers at {shoff:#x} do not fit the file")
    stream.seek(shoff)
    table = stream.read(count * layout.size)
    return [layout.unpack_from(table, i * layout.size) for i in range(count)]


def _loads(elf: ELFFile) -> tuple[LoadSegment, ...]:
    loads = []
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD":
            h = segment.header
            loads.append(LoadSegment(h.p_offset, h.p_vaddr, h.p_filesz, h.p_memsz, h.p_flags))
    return tuple(loads)


def _build_id(elf: ELFFile) -> str:
    # Sections first (debug files keep them); segments when section headers are gone.
    containers: list[Any] = [s for s in elf.iter_sections() if s["sh_type"] == "SHT_NOTE"]
    if not containers:
        containers = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    for container in containers:
        for note in container.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID" and isinstance(note["n_desc"], str):
                return note["n_desc"].lower()
    return ""


def _debuglink(elf: ELFFile) -> DebugLink | None:
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None or section["sh_type"] == "SHT_NOBITS":
        return None
    data = section.data()
    name, nul, _ = data.partition(b"\0")
    if not nul or not name:
        return None
    crc_offset = (len(name) + 1 + 3) & ~3  # name, NUL, padding to 4 bytes, then CRC32
    if len(data) < crc_offset + 4:
        return None
    order = "<" if elf.little_endian else ">"
    (crc,) = struct.unpack_from(order + "I", data, crc_offset)
    return DebugLink(name.decode("utf-8", "surrogateescape"), crc)


def _has_dwarf(elf: ELFFile) -> bool:
    for name in (".debug_info", ".zdebug_info"):
        section = elf.get_section_by_name(name)
        if section is not None and section["sh_type"] != "SHT_NOBITS" and section["sh_size"]:
            return True
    return False


def _function_symbols(elf: ELFFile) -> FoundSymbols:
    """Defined functions in .symtab and .dynsym, and PLT stubs.

    Parsed with struct rather than pyelftools' per-symbol objects: ~10x faster on
    large libraries, and this runs on the sampling path.
    """
    found = FoundSymbols()
    for section_name in (".symtab", ".dynsym"):
        if len(found) >= MAX_SYMBOLS:
            break
        section = elf.get_section_by_name(section_name)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            continue
        strings = elf.get_section(section["sh_link"]).data()
        found.add_table(section.data(), strings, elf.elfclass, elf.little_endian)
    for value, size, name, is_global in plt_symbols(elf):
        found.add(value, size, name, is_global)
    return found
