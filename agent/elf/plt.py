"""Symbols for x86-64 PLT stubs: `name@plt`, as perf and objdump call them.

No symbol table covers the PLT, so a sample in a stub would be named after whatever
symbol precedes it (often `_init`). Stub layouts differ by linker (bfd, gold, lld, mold),
by section (lazy .plt, IBT's .plt.sec, .plt.got) and by IBT, so rather than assume one,
each entry's `jmp *slot(%rip)` is decoded and its GOT slot looked up in the dynamic
relocations that bind a symbol there (JUMP_SLOT, GLOB_DAT). IRELATIVE slots have no
symbol and stay unnamed, as do files without section headers.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any

from elftools.elf.elffile import ELFFile

R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
SHF_EXECINSTR = 0x4
PLT_PREFIXES = (".plt", ".iplt")
ENDBR64 = b"\xf3\x0f\x1e\xfa"
MOV_R11D = b"\x41\xbb"  # mold: mov $relocation_index, %r11d before the jump
PUSH_R11 = b"\x41\x53"  # mold's PLT0
MAX_PLT_BYTES = 16 << 20  # 1M stubs; real PLTs are a few thousand at most
_RELA = struct.Struct("<QQq")  # Elf64_Rela: offset, info, addend
_SYM_SIZE = 24  # Elf64_Sym; st_name is its first 4 bytes
_U32 = struct.Struct("<I")
_DISP = struct.Struct("<i")
_WANTED_TYPES = re.compile(b"[" + bytes([R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT]) + b"]")

PltSymbol = tuple[int, int, str, bool]  # vaddr, size, name, is global (as reader.RawSymbol)


def plt_symbols(elf: ELFFile) -> list[PltSymbol]:
    """(vaddr, size, "name@plt", False) for each PLT stub of an x86-64 ELF file.

    The lazy PLT's header is named after its section (".plt", as perf does). [] when
    there is none, the file is not x86-64 or it is malformed.
    """
    try:
        if elf["e_machine"] != "EM_X86_64" or elf.elfclass != 64 or not elf.little_endian:
            return []
        sections = list(elf.iter_sections())
        slots = _slot_names(sections)
        symbols: list[PltSymbol] = []
        for section in sections:
            if slots and _is_plt(section):
                symbols.extend(_section_stubs(section, slots))
        return symbols
    except Exception:  # corrupt input: stub names are a nicety, never a reason to fail
        return []


def _slot_names(sections: list[Any]) -> dict[int, str]:
    """GOT slot address -> name of the symbol its JUMP_SLOT or GLOB_DAT relocation binds."""
    names: dict[int, str] = {}
    for section in sections:
        link = section["sh_link"]
        if section["sh_type"] != "SHT_RELA" or not 0 < link < len(sections):
            continue
        symtab = sections[link]
        if symtab["sh_type"] != "SHT_DYNSYM" or not 0 < symtab["sh_link"] < len(sections):
            continue
        strings = sections[symtab["sh_link"]].data()
        names.update(_bound_slots(section.data(), symtab.data(), strings))
    return names


def _bound_slots(relocations: bytes, symbols: bytes, strings: bytes) -> Iterator[tuple[int, str]]:
    usable = len(relocations) - len(relocations) % _RELA.size
    # Candidates by the low byte of r_info, in C: .rela.dyn of a large C++ library holds
    # 100k+ relocations, nearly all R_X86_64_RELATIVE.
    low_types = memoryview(relocations)[8 : usable : _RELA.size].tobytes()
    for candidate in _WANTED_TYPES.finditer(low_types):
        slot, info, _ = _RELA.unpack_from(relocations, candidate.start() * _RELA.size)
        if info & 0xFFFFFFFF not in (R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT):
            continue
        entry = (info >> 32) * _SYM_SIZE
        if entry + _SYM_SIZE > len(symbols):
            continue
        (start,) = _U32.unpack_from(symbols, entry)
        end = strings.find(b"\0", start)
        if 0 < start < end:
            yield slot, strings[start:end].decode("utf-8", "surrogateescape")


def _is_plt(section: Any) -> bool:
    return bool(
        section["sh_type"] == "SHT_PROGBITS"
        and section["sh_flags"] & SHF_EXECINSTR
        and section.name.startswith(PLT_PREFIXES)
        and 0 < section["sh_size"] <= MAX_PLT_BYTES
    )


def _entry_size(section: Any) -> int:
    """sh_entsize; lld and mold write 0 but align PLT sections to their 16-byte entries."""
    for size in (section["sh_entsize"], section["sh_addralign"]):
        if size in (8, 16):
            return int(size)
    return 16


def _section_stubs(section: Any, slots: dict[int, str]) -> list[PltSymbol]:
    data, base, step = section.data(), section["sh_addr"], _entry_size(section)
    stubs: list[PltSymbol] = []
    first_jump = len(data)
    for start in range(0, len(data), step):
        target = _jump_slot(data[start : start + step])
        if target is None:
            continue
        first_jump = min(first_jump, start)
        name = slots.get(base + start + target)  # None for IRELATIVE slots
        if name is not None:
            stubs.append((base + start, step, name + "@plt", False))
    if _is_header(data[:32]):
        # The header and, with IBT, the lazy entries after it: up to the first stub.
        stubs.insert(0, (base, first_jump, section.name, False))
    return stubs


def _jump_slot(entry: bytes) -> int | None:
    """Offset from the entry's start of the GOT slot its `jmp *disp(%rip)` reads, or None."""
    pos = len(ENDBR64) if entry.startswith(ENDBR64) else 0
    if entry[pos : pos + 2] == MOV_R11D:
        pos += 6
    if entry[pos : pos + 1] == b"\xf2":  # bnd prefix (MPX-era binutils)
        pos += 1
    if entry[pos : pos + 2] != b"\xff\x25" or len(entry) < pos + 6:
        return None
    return pos + 6 + _DISP.unpack_from(entry, pos + 2)[0]


def _is_header(data: bytes) -> bool:
    """PLT0: `push GOT+8(%rip); jmp *GOT+16(%rip)`, the lazy resolver's trampoline."""
    pos = len(ENDBR64) if data.startswith(ENDBR64) else 0
    if data[pos : pos + 2] == PUSH_R11:
        pos += 2
    if data[pos : pos + 2] != b"\xff\x35" or len(data) < pos + 6:
        return False
    pushed = pos + 6 + _DISP.unpack_from(data, pos + 2)[0]
    jumped = _jump_slot(data[pos + 6 :])
    return jumped is not None and pos + 6 + jumped == pushed + 8
