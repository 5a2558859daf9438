"""Go function, file and line (inlined calls included) at an address, from `.gopclntab`.

Go binaries keep their own line table in `.gopclntab` even when stripped
(`-ldflags='-s -w'` drops .symtab and DWARF): the runtime needs it for tracebacks.
This reads it the way the runtime does (runtime/symtab.go, runtime/symtabinl.go,
debug/gosym/pclntab.go) for the table formats of Go 1.2, 1.16, 1.18 and 1.20+, in
executables, PIEs and shared libraries. Frames carry start_line from 1.20 tables on.

A long-lived daemon keeps many binaries open, so the file is mmapped (page cache, not
heap) and only the header and the function table are read up front, as zero-copy
views; a lookup decodes just the pc-value tables it needs. Every read is bounds-checked:
malformed input raises GoTableError from read() and makes frames() return ().
Caveat of the mmap: a file truncated in place while mapped raises SIGBUS on access.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import operator
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from typing import IO, Literal, NamedTuple

from elftools.elf.elffile import ELFFile

from agent.elf.reader import check_layout
from agent.model import Frame

MAGICS = {0xFFFFFFFB: "1.2", 0xFFFFFFFA: "1.16", 0xFFFFFFF0: "1.18", 0xFFFFFFF1: "1.20"}
MAX_FUNCS = 1 << 24
MAX_STRING = 1 << 16  # a longer function name or path is corrupt
MAX_INLINE_DEPTH = 128
MAX_INLINE_INDEX = 1 << 20  # as the runtime's (*[1 << 20]inlinedCall)
MAX_PCDATA = 1 << 10
PCDATA_INL_TREE_INDEX = 2
FUNCDATA_INL_TREE = 3
NT_GO_BUILD_ID = 4
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
# Go's linker names the table .gopclntab, or .data.rel.ro.gopclntab in a PIE; an external
# linker merges the latter into .data.rel.ro. Go binaries all carry one of GO_SECTIONS.
PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
GO_SECTIONS = (".note.go.buildid", ".go.buildinfo")
MAX_CANDIDATES = 16
# R_*_RELATIVE per machine: how shared libraries and PIEs relocate moduledata's pointers.
RELATIVE = {"EM_X86_64": 8, "EM_AARCH64": 1027, "EM_PPC64": 22, "EM_S390": 12, "EM_RISCV": 3}
# Word index in runtime.moduledata of text and of gofunc (go:func.*, the base of 1.18+
# funcdata offsets); 1.20 added covctrs and ecovctrs before gofunc.
MD_TEXT = 22
MD_GOFUNC = {"1.18": 38, "1.20": 40}
# _func after its entry: nameoff, args, deferreturn, pcsp, pcfile, pcln, npcdata,
# [cuOffset], [startLine]; then funcID, flag, pad, nfuncdata ("3xB").
FUNC_FIELDS = {"1.2": "iiIIIIi", "1.16": "iiIIIIiI", "1.18": "iiIIIIiI", "1.20": "iiIIIIiIi"}
# inlinedCall 1.12-1.19: parent, funcID, pad, file, line, nameoff, parentPc (1.9-1.11
# had 16-byte entries: the sanity check at read turns inlining off for them);
# from 1.20: funcID, nameoff, parentPc, startLine.
INLINED_CALL = {False: "hBBiiii", True: "B3xiii"}


class GoTableError(Exception):
    """The Go line table is malformed or in a format we do not support."""


class _Section(NamedTuple):
    name: str
    type: str
    flags: int
    addr: int
    offset: int
    size: int


SECTION_FIELDS = ("sh_type", "sh_flags", "sh_addr", "sh_offset", "sh_size")
Layout = tuple[list[_Section], list[tuple[int, int, int]], str, str]  # see _elf_layout


class _Func(NamedTuple):
    nameoff: int
    pcfile: int
    pcln: int
    npcdata: int
    cu: int
    start_line: int
    nfuncdata: int


class GoTable:
    """The .gopclntab of one ELF file; frames() answers per ELF virtual address."""

    build_id: str  # the Go build id (.note.go.buildid), "" when none
    version_format: str  # "1.2", "1.16", "1.18" or "1.20": the table magic found

    @classmethod
    def read(cls, path: str) -> GoTable | None:
        """None when the file is not ELF or has no Go line table (not a Go binary);
        GoTableError when the table is malformed; OSError when it cannot be opened."""
        with open(path, "rb") as stream:
            if stream.read(4) != b"\x7fELF":
                return None
            sections, loads, machine, order = _elf_layout(stream)
            named = [s for s in sections if s.name in PCLNTAB_SECTIONS and s.type != "SHT_NOBITS"]
            if not named and not any(s.name in GO_SECTIONS for s in sections):
                return None
            mm = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        candidates = named[:1] or list(
            itertools.islice(_merged_tables(mm, sections, order), MAX_CANDIDATES)
        )
        for number, pcln in enumerate(candidates):
            try:
                table = cls(mm, pcln, loads)
                if table.version_format in MD_GOFUNC:
                    table._locate_text(sections, machine)
            except GoTableError:
                if number + 1 == len(candidates):
                    raise
                continue
            table.build_id = _go_build_id(mm, sections, order)
            table._inlining = table._trees_look_sane()  # else: a layout we do not know
            return table
        return None

    def __init__(self, mm: mmap.mmap, pcln: _Section, loads: list[tuple[int, int, int]]) -> None:
        self._mm, self._loads = mm, loads  # loads: (vaddr, filesz, offset) of PT_LOADs
        self._start, self._end = pcln.offset, pcln.offset + pcln.size
        self._vaddr = pcln.addr
        self._text = 0  # 1.18+: entry PCs are offsets from runtime.text
        self._gofunc = 0  # 1.18+: funcdata are offsets from go:func.*; 0 when unknown
        self._inlining = True  # whether inline trees are read
        self.build_id = ""
        self._parse_header()
        entry = "I" if self.version_format in MD_GOFUNC else self._word.format[1]
        self._func = struct.Struct(self._order + entry + FUNC_FIELDS[self.version_format] + "3xB")
        self._inlined = struct.Struct(self._order + INLINED_CALL[self.version_format == "1.20"])

    def __len__(self) -> int:
        return len(self._funcoffs)

    def frames(self, vaddr: int) -> tuple[Frame, ...]:
        """Frames at an ELF virtual address, innermost (inlined) first, the real function
        last; () when vaddr is in no function or the table is corrupt there. Give a
        return address minus one, as the runtime does, to get the call's line."""
        try:
            return self._frames(vaddr)
        except GoTableError:
            return ()

    # -- header and function table, read once --

    def _parse_header(self) -> None:
        if self._end - self._start < 16:
            raise GoTableError("truncated .gopclntab header")
        head = self._mm[self._start : self._start + 8]
        for order in "<>":
            if (magic := struct.unpack(order + "I", head[:4])[0]) in MAGICS:
                break
        else:
            raise GoTableError(f"unsupported .gopclntab magic {head[:4].hex()}")
        if head[4:6] != b"\0\0" or head[6] not in (1, 2, 4) or head[7] not in (4, 8):
            raise GoTableError("bad .gopclntab header")
        self._order, self.version_format = order, MAGICS[magic]
        self._quantum, self._ptr = head[6], head[7]
        self._word = struct.Struct(order + ("Q" if self._ptr == 8 else "I"))
        self._u32 = struct.Struct(order + "I")
        self._parse_regions()

    def _parse_regions(self) -> None:
        """Where the name, CU, file, pc-value and function tables start (file offsets)."""
        ptr, start, version = self._ptr, self._start, self.version_format
        field, first = ptr, 3 if version in MD_GOFUNC else 2
        count = 1 if version == "1.2" else first + 5
        words = [self._read(self._word, start + 8 + i * ptr)[0] for i in range(count)]
        nfunc = words[0]
        if version == "1.2":  # one blob: offsets are from its start; functab follows
            self._names = self._pctab = self._funcdata = start
            functab = start + 8 + ptr
        else:
            if first == 3:
                self._text, field = words[2], 4
            offsets = words[first : first + 5]
            if any(offset >= self._end - start for offset in offsets):
                raise GoTableError("table offset out of .gopclntab")
            self._names, self._cutab, self._filetab, self._pctab, self._funcdata = (
                start + offset for offset in offsets
            )
            functab = self._funcdata
        if not 0 < nfunc <= MAX_FUNCS or functab + (2 * nfunc + 1) * field > self._end:
            raise GoTableError(f"function table of {nfunc} entries does not fit")
        if version == "1.2":
            self._filetab = start + self._read(self._u32, functab + (2 * nfunc + 1) * ptr)[0]
            self._nfiles = self._read(self._u32, self._filetab)[0]
        table = self._view(functab, 2 * nfunc + 1, field)
        self._entries, self._funcoffs = table[0::2], table[1::2]  # entries: one more, the end
        if any(map(operator.gt, self._entries, self._entries[1:])):
            raise GoTableError("function table is not sorted")

    def _view(self, offset: int, count: int, size: int) -> Sequence[int]:
        """count integers of size bytes at offset: zero-copy unless byte-swapped."""
        code: Literal["I", "Q"] = "Q" if size == 8 else "I"
        if self._order == ("<" if sys.byteorder == "little" else ">"):
            return memoryview(self._mm)[offset : offset + count * size].cast(code)
        values = array(code, self._mm[offset : offset + count * size])
        values.byteswap()
        return values

    def _locate_text(self, sections: list[_Section], machine: str) -> None:
        """1.18+: the text start (when the header holds it unrelocated: shared libraries)
        and go:func.*, both from runtime.firstmoduledata."""
        names = self._vaddr + self._names - self._start
        found = self._moduledata_plain(sections, names) or self._moduledata_rela(
            sections, names, RELATIVE.get(machine, -1)
        )
        text, gofunc = found or (0, 0)
        if self._text and text != self._text:
            text, gofunc = 0, 0  # not the moduledata of this table after all
        self._text = self._text or text
        if not self._text:  # as go tool addr2line does: .text starts with runtime.text
            self._text = next((s.addr for s in sections if s.name == ".text"), 0)
        if not self._text:
            raise GoTableError("cannot tell where the table's text starts")
        self._gofunc = gofunc if self._to_offset(gofunc, 1) is not None else 0

    def _trees_look_sane(self, samples: int = 16) -> bool:
        """Whether the first inline tree entries of some functions name a function and
        a call site inside it: whether gofunc and the entry layout are right."""
        for index in itertools.islice(range(0, len(self), max(1, len(self) // 256)), 256):
            func_offset = self._funcdata + self._funcoffs[index]
            try:
                tree = self._inline_tree(func_offset, self._func_at(func_offset))
                if tree is None or tree[0] + self._inlined.size > tree[1]:
                    continue
                nameoff, parent_pc, _ = self._inlined_call(tree[0])
                self._string(self._names, nameoff)
                fields = self._inlined.unpack_from(self._mm, tree[0])
                if len(fields) == 7 and fields[2]:  # 1.12-1.19: the pad byte is 0
                    return False
            except GoTableError:
                return False
            name_start = nameoff == 0 or self._mm[self._names + nameoff - 1] == 0
            if not name_start or not 0 <= parent_pc < self._size(index):
                return False
            samples -= 1
            if not samples:
                break
        return True

    # -- lookups --

    def _frames(self, vaddr: int) -> tuple[Frame, ...]:
        index = bisect.bisect_right(self._entries, vaddr - self._text) - 1
        if not 0 <= index < len(self._funcoffs):
            return ()
        entry, size = self._entries[index] + self._text, self._size(index)
        func_offset = self._funcdata + self._funcoffs[index]
        func = self._func_at(func_offset)
        limit = size // self._quantum + 8  # a pc-value step never covers less than a quantum
        tree = self._inline_tree(func_offset, func)
        frames: list[Frame] = []
        seen: set[int] = set()
        pc = vaddr
        for _ in range(MAX_INLINE_DEPTH):
            file, line = self._file_line(func, entry, pc, limit)
            call = -1
            if tree is not None and func.npcdata > PCDATA_INL_TREE_INDEX:
                table = func_offset + self._func.size + 4 * PCDATA_INL_TREE_INDEX
                call = self._pcvalue(self._read(self._u32, table)[0], entry, pc, limit)
            if call < 0 or tree is None:
                name = self._string(self._names, func.nameoff)
                return (*frames, Frame(name, file, line, func.start_line))
            at = tree[0] + call * self._inlined.size
            if call >= MAX_INLINE_INDEX or call in seen or at + self._inlined.size > tree[1]:
                raise GoTableError(f"bad inline tree index {call}")
            seen.add(call)
            nameoff, parent_pc, start_line = self._inlined_call(at)
            frames.append(Frame(self._string(self._names, nameoff), file, line, start_line))
            if not 0 <= parent_pc < size:
                raise GoTableError("inlined call site outside its function")
            pc = entry + parent_pc  # an instruction at the call site, in the caller
        raise GoTableError("inline tree too deep")

    def _size(self, index: int) -> int:
        return self._entries[index + 1] - self._entries[index]

    def _func_at(self, offset: int) -> _Func:
        fields = self._read(self._func, offset)[1:]  # after the entry
        cu = fields[7] if len(fields) > 8 else 0
        start_line = fields[8] if len(fields) > 9 else 0
        if not 0 <= fields[6] <= MAX_PCDATA:
            raise GoTableError(f"absurd npcdata {fields[6]}")
        return _Func(fields[0], fields[4], fields[5], fields[6], cu, start_line, fields[-1])

    def _inlined_call(self, offset: int) -> tuple[int, int, int]:
        """(nameoff, parentPc, startLine) of an inline tree entry."""
        fields = self._inlined.unpack_from(self._mm, offset)
        return (fields[1], fields[2], fields[3]) if len(fields) == 4 else (fields[5], fields[6], 0)

    def _inline_tree(self, func_offset: int, func: _Func) -> tuple[int, int] | None:
        """(file offset, end of its PT_LOAD's bytes) of the function's inline tree."""
        if func.nfuncdata <= FUNCDATA_INL_TREE or not self._inlining:
            return None
        slots = func_offset + self._func.size + 4 * func.npcdata
        if self.version_format in MD_GOFUNC:
            (offset,) = self._read(self._u32, slots + 4 * FUNCDATA_INL_TREE)
            if offset == 0xFFFFFFFF or not self._gofunc:
                return None
            return self._to_offset(self._gofunc + offset, 0)
        if self._ptr == 8 and (self._vaddr + slots - self._start) & 4:
            slots += 4  # before 1.18 funcdata are pointers, pointer-aligned in memory
        (address,) = self._read(self._word, slots + self._ptr * FUNCDATA_INL_TREE)
        return self._to_offset(address, 0) if address else None

    def _file_line(self, func: _Func, entry: int, pc: int, limit: int) -> tuple[str, int]:
        fileno = self._pcvalue(func.pcfile, entry, pc, limit)
        line = self._pcvalue(func.pcln, entry, pc, limit)
        return self._file(func, fileno), max(line, 0)

    def _file(self, func: _Func, fileno: int) -> str:
        if self.version_format == "1.2":
            if not 0 < fileno < self._nfiles:
                return ""
            return self._string(self._start, self._read(self._u32, self._filetab + 4 * fileno)[0])
        if fileno < 0 or func.cu == 0xFFFFFFFF:
            return ""
        (offset,) = self._read(self._u32, self._cutab + 4 * (func.cu + fileno))
        return "" if offset == 0xFFFFFFFF else self._string(self._filetab, offset)

    def _pcvalue(self, table: int, entry: int, target: int, limit: int) -> int:
        """The value of a pc-value table at target (runtime.pcvalue); -1 when none.

        Decodes a copied window of the table, widened when the decoder runs off it."""
        if table == 0:
            return -1
        # Tables take well under a byte per instruction byte: one window is the rule.
        start, size = self._pctab + table, min(256 + (target - entry) // self._quantum, 1 << 20)
        while True:
            window = self._mm[start : min(start + size, self._end)]
            try:
                return _pcvalue(window, entry, target, limit, self._quantum)
            except IndexError:
                if start + size >= self._end:
                    raise GoTableError("pc-value table runs off .gopclntab") from None
                size *= 8

    # -- bounds-checked reads --

    def _read(self, layout: struct.Struct, offset: int) -> tuple[int, ...]:
        if not self._start <= offset <= self._end - layout.size:
            raise GoTableError(f"read at {offset:#x} outside .gopclntab")
        return layout.unpack_from(self._mm, offset)

    def _string(self, base: int, offset: int) -> str:
        start = base + offset
        if offset < 0 or not self._start <= start < self._end:
            raise GoTableError(f"string at {start:#x} outside .gopclntab")
        end = self._mm.find(b"\0", start, min(start + MAX_STRING, self._end))
        if end < 0:
            raise GoTableError(f"unterminated string at {start:#x}")
        return self._mm[start:end].decode("utf-8", "replace")

    def _to_offset(self, vaddr: int, size: int) -> tuple[int, int] | None:
        """(file offset, end of its PT_LOAD's file bytes) of size bytes at an ELF vaddr."""
        for load_vaddr, filesz, offset in self._loads:
            inside = load_vaddr <= vaddr and vaddr + size <= load_vaddr + filesz
            if inside and offset + filesz <= len(self._mm):
                return offset + vaddr - load_vaddr, offset + filesz
        return None

    # -- runtime.firstmoduledata: its first two words point at the table and its names --

    def _moduledata_plain(self, sections: list[_Section], names: int) -> tuple[int, int] | None:
        """(text, gofunc) from a moduledata that holds its pointers (executables)."""
        pattern = self._word.pack(self._vaddr) + self._word.pack(names)
        words = MD_GOFUNC[self.version_format] + 1
        for section in sections:
            if section.type != "SHT_PROGBITS" or not section.flags & SHF_WRITE:
                continue
            end = section.offset + section.size
            for at in self._find(pattern, section.offset, end, self._ptr, section.addr):
                if at + words * self._ptr <= end:
                    view = self._view(at, words, self._ptr)
                    return view[MD_TEXT], view[words - 1]
        return None

    def _moduledata_rela(
        self, sections: list[_Section], names: int, relative: int
    ) -> tuple[int, int] | None:
        """(text, gofunc) from a moduledata whose pointers are R_*_RELATIVE relocations
        (shared libraries, PIEs): the file holds zeros, the addends hold the values."""
        if self._ptr != 8:
            return None  # 32-bit ELF uses REL: the values are in place
        rela = struct.Struct(self._order + "QQQ")
        pattern = struct.pack(self._order + "QQ", relative, self._vaddr)
        words = MD_GOFUNC[self.version_format] + 1
        for section in (s for s in sections if s.type == "SHT_RELA"):
            end = section.offset + section.size - section.size % rela.size
            for at in self._find(pattern, section.offset + 8, end, rela.size, 0):
                (base,) = struct.unpack_from(self._order + "Q", self._mm, at - 8)
                values: dict[int, int] = {}  # relocations follow in address order
                for position in range(at - 8, min(end, at - 8 + 4 * words * rela.size), 24):
                    r_offset, info, addend = rela.unpack_from(self._mm, position)
                    if info == relative and base <= r_offset < base + words * 8:
                        values[(r_offset - base) // 8] = addend
                if values.get(1) == names:
                    return values.get(MD_TEXT, 0), values.get(words - 1, 0)
        return None

    def _find(self, pattern: bytes, start: int, end: int, align: int, bias: int) -> Iterator[int]:
        """Offsets of pattern in [start, end) with (offset - start + bias) % align == 0."""
        at = self._mm.find(pattern, start, end)
        while at >= 0:
            if (at - start + bias) % align == 0:
                yield at
            at = self._mm.find(pattern, at + 1, end)


def _pcvalue(data: bytes, entry: int, target: int, limit: int, quantum: int) -> int:
    """runtime.pcvalue over data (IndexError when it runs off the end): the hot loop."""
    pc, value, p = entry, -1, 0
    for _ in range(limit):
        delta = data[p]
        p += 1
        if delta > 0x7F:
            delta, p = _varint(data, p, delta)
        if delta == 0 and pc != entry:
            return -1  # a zero value delta after the first step ends the table
        value += _ZIGZAG[delta] if delta < 128 else -(delta >> 1) - 1 if delta & 1 else delta >> 1
        step = data[p]
        p += 1
        if step > 0x7F:
            step, p = _varint(data, p, step)
        pc += step * quantum
        if target < pc:
            return value
    raise GoTableError("pc-value table runs past its function")


_ZIGZAG = tuple(-(delta >> 1) - 1 if delta & 1 else delta >> 1 for delta in range(128))


def _varint(data: bytes, p: int, first: int) -> tuple[int, int]:
    """The rest of a varint whose first byte (continuation bit set) was first."""
    value, shift = first & 0x7F, 7
    while shift < 35:
        byte = data[p]
        value |= (byte & 0x7F) << shift
        p, shift = p + 1, shift + 7
        if byte < 0x80:
            return value & 0xFFFFFFFF, p
    raise GoTableError("varint too long")


def _elf_layout(stream: IO[bytes]) -> Layout:
    """Sections, PT_LOADs (vaddr, filesz, offset), machine and byte order of an ELF file."""
    try:
        check_layout(stream)
        elf = ELFFile(stream)
        sections = [_Section(s.name, *(s[k] for k in SECTION_FIELDS)) for s in elf.iter_sections()]
        loads = [
            (s["p_vaddr"], s["p_filesz"], s["p_offset"])
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
        return sections, loads, elf["e_machine"], "<" if elf.little_endian else ">"
    except Exception as exc:  # pyelftools raises many types on corrupt input
        raise GoTableError(f"{type(exc).__name__}: {exc}") from exc


def _merged_tables(mm: mmap.mmap, sections: list[_Section], order: str) -> Iterator[_Section]:
    """Where an external linker put the table of a PIE: by its header, in a data section."""
    for section in sections:
        data = section.flags & SHF_ALLOC and not section.flags & SHF_EXECINSTR
        if section.type != "SHT_PROGBITS" or not data:
            continue
        end = section.offset + section.size
        for magic in MAGICS:
            pattern = struct.pack(order + "I", magic) + b"\0\0"
            at = mm.find(pattern, section.offset, end)
            while at >= 0:
                vaddr = section.addr + at - section.offset
                if vaddr % 8 == 0:
                    yield section._replace(addr=vaddr, offset=at, size=end - at)
                at = mm.find(pattern, at + 1, end)


def _go_build_id(mm: mmap.mmap, sections: list[_Section], order: str) -> str:
    """The desc of the ELF note named "Go" of type 4 (.note.go.buildid), "" if none."""
    header = struct.Struct(order + "III")
    for section in (s for s in sections if s.type == "SHT_NOTE"):
        at, end = section.offset, min(section.offset + section.size, len(mm))
        while at + header.size <= end:
            namesz, descsz, kind = header.unpack_from(mm, at)
            desc = at + header.size + (namesz + 3) // 4 * 4
            following = desc + (descsz + 3) // 4 * 4
            if following > end:
                break
            name = mm[at + header.size : at + header.size + namesz].rstrip(b"\0")
            if kind == NT_GO_BUILD_ID and name == b"Go":
                return mm[desc : desc + descsz].rstrip(b"\0").decode("utf-8", "replace")
            at = following
    return ""
