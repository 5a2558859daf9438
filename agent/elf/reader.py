"""ELF headers, notes and function symbols (pyelftools), and address translation.

A runtime address becomes an ELF virtual address in two steps that hold for PIE,
non-PIE executables and shared libraries alike:
    file offset = address - mapping.start + mapping.offset
    ELF vaddr   = file offset - load.p_offset + load.p_vaddr   (the PT_LOAD holding it)
"""

from __future__ import annotations

import bisect
import itertools
import struct
from array import array
from collections.abc import Iterator
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


class SymbolTable:
    """Function symbols sorted by address; lookup by bisection, sizes honoured.

    Packed (addresses and sizes in arrays, names in one bytes blob): a host maps
    binaries with 100k+ long (C++, Rust) symbols, and a Python string and list slot
    per symbol would cost ~150 bytes each for every binary the agent keeps.
    """

    def __init__(self, symbols: list[RawSymbol]) -> None:
        # One name per address: the best of aliases (sized, global, no leading "_").
        best: dict[int, tuple[int, str, tuple[bool, bool, bool]]] = {}
        for value, size, name, is_global in symbols:
            rank = (size > 0, is_global, not name.startswith("_"))
            current = best.get(value)
            if current is None or rank > current[2]:
                best[value] = (size, name, rank)
        starts = sorted(best)
        self._starts = array("Q", starts)
        self._sizes = array("Q", (best[start][0] for start in starts))
        names = [best[start][1].encode("utf-8", "surrogatepass") for start in starts]
        self._name_ends = array("Q", itertools.accumulate(len(name) for name in names))
        self._names = b"".join(names)
        # The other names of a sized symbol (same start and size): few per binary.
        self._aliases: dict[int, tuple[str, ...]] = {}
        for value, size, name, _ in symbols:
            kept_size, kept_name, _ = best[value]
            others = self._aliases.get(value, ())
            if size and size == kept_size and name != kept_name and name not in others:
                self._aliases[value] = (*others, name)

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
        return self._names[start : self._name_ends[index]].decode("utf-8", "surrogatepass")


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


def _function_symbols(elf: ELFFile) -> list[RawSymbol]:
    """(value, size, name) of defined functions in .symtab and .dynsym, and PLT stubs.

    Parsed with struct rather than pyelftools' per-symbol objects: ~10x faster on
    large libraries, and this runs on the sampling path.
    """
    symbols: list[RawSymbol] = []
    for section_name in (".symtab", ".dynsym"):
        if len(symbols) >= MAX_SYMBOLS:
            break
        section = elf.get_section_by_name(section_name)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            continue
        strings = elf.get_section(section["sh_link"]).data()
        symbols.extend(_parse_symbols(section.data(), strings, elf.elfclass, elf.little_endian))
    return symbols + plt_symbols(elf)


def _parse_symbols(
    data: bytes, strings: bytes, elfclass: int, little_endian: bool
) -> Iterator[RawSymbol]:
    order = "<" if little_endian else ">"
    # Elf64_Sym: name, info, other, shndx, value, size; Elf32_Sym: name, value, size, info, ...
    layout = struct.Struct(order + ("IBBHQQ" if elfclass == 64 else "IIIBBH"))
    usable = len(data) - len(data) % layout.size
    for fields in layout.iter_unpack(data[:usable]):
        if elfclass == 64:
            name_offset, info, _, shndx, value, size = fields
        else:
            name_offset, value, size, info, _, shndx = fields
        if info & 0xF not in (STT_FUNC, STT_GNU_IFUNC) or shndx == SHN_UNDEF or not value:
            continue
        end = strings.find(b"\0", name_offset)
        name = strings[name_offset : end if end >= 0 else len(strings)]
        if not name:
            continue
        yield value, size, name.decode("utf-8", "surrogateescape"), info >> 4 == STB_GLOBAL
