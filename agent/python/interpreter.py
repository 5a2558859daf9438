"""Finding a process's CPython: the mapped file that holds `_PyRuntime`, its version,
and the struct offsets to walk its frames.

Pure file work (the ELF's symbols and data), so it can run at exec, before the
interpreter has initialised: the BPF walker reads `_PyRuntime`'s interpreter list on
every sample. What the process holds is checked as soon as there is something to
check (`check_runtime`, and each code object's type when it is read).
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from agent.elf.mapped_files import open_mapped_file
from agent.elf.reader import LoadSegment
from agent.model import Mapping, ProcessInfo
from agent.process.reader import PROC
from agent.python.memory import read_pointer
from agent.python.offsets import DEBUG_OFFSETS_SIZE, OFFSETS, PythonOffsets, parse_debug_offsets
from agent.unwind.mappings import load_of

log = logging.getLogger(__name__)

# python3.11, python3, libpython3.12.so.1.0, libpython3.13t.so: where CPython lives.
CANDIDATE_NAME = re.compile(r"^(?:lib)?python(\d)(?:\.(\d+))?")
SYMBOLS = (b"_PyRuntime", b"PyCode_Type", b"Py_Version")
MAX_BINARIES = 256
SUPPORTED = (min(OFFSETS), max(OFFSETS))


@dataclass(frozen=True, slots=True)
class InterpreterBinary:
    """What one libpython / python executable file says about itself."""

    version: tuple[int, int]
    offsets: PythonOffsets | None  # None: a version we have no offsets for
    runtime_vaddr: int
    code_type_vaddr: int  # 0: unknown
    loads: tuple[LoadSegment, ...]


@dataclass(frozen=True, slots=True)
class Interpreter:
    """A process's CPython, at its runtime addresses."""

    version: tuple[int, int]
    offsets: PythonOffsets
    runtime: int  # address of _PyRuntime
    code_type: int  # address of PyCode_Type; 0: unknown (no check)
    path: str


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A CPython whose version this agent cannot walk."""

    version: tuple[int, int]
    path: str


_BINARIES: OrderedDict[str, InterpreterBinary | None] = OrderedDict()


def find_interpreter(process: ProcessInfo, proc: Path = PROC) -> Interpreter | Unsupported | None:
    """The process's CPython, if it maps one; never raises for what a host contains."""
    seen: set[str] = set()
    for mapping in process.mappings:
        name = os.path.basename(mapping.path)
        if mapping.path in seen or not CANDIDATE_NAME.match(name):
            continue
        seen.add(mapping.path)
        binary = _binary_of(process.pid, mapping, proc)
        if binary is None:
            continue
        if binary.offsets is None:
            return Unsupported(binary.version, mapping.path)
        bias = _load_bias(process.mappings, mapping.path, binary.loads)
        if bias is None:
            continue
        code_type = binary.code_type_vaddr + bias if binary.code_type_vaddr else 0
        return Interpreter(
            binary.version, binary.offsets, binary.runtime_vaddr + bias, code_type, mapping.path
        )
    return None


def check_runtime(pid: int, interpreter: Interpreter) -> bool:
    """Whether the process's interpreter state agrees with the offsets: False only when
    it contradicts them (a thread state whose interp is not its interpreter). Not yet
    initialised (no interpreter or thread) is no contradiction."""
    offsets = interpreter.offsets
    interp = read_pointer(pid, interpreter.runtime + offsets.runtime_interpreters_head)
    if not interp:
        return True
    tstate = read_pointer(pid, interp + offsets.interp_threads_head)
    if not tstate:
        return True
    return read_pointer(pid, tstate + offsets.tstate_interp) == interp


def _binary_of(pid: int, mapping: Mapping, proc: Path) -> InterpreterBinary | None:
    opened = open_mapped_file(pid, mapping, proc)
    if opened is None:
        return None
    key = opened.file_key
    if key in _BINARIES:
        _BINARIES.move_to_end(key)
        return _BINARIES[key]
    try:
        with open(opened.path, "rb") as stream:
            binary = read_interpreter_binary(stream, os.path.basename(mapping.path))
    except (OSError, ELFError, ValueError, struct.error) as exc:
        log.debug("not reading %s as CPython: %s", mapping.path, exc)
        binary = None
    _BINARIES[key] = binary
    if len(_BINARIES) > MAX_BINARIES:
        _BINARIES.popitem(last=False)
    return binary


def read_interpreter_binary(stream: IO[bytes], name: str) -> InterpreterBinary | None:
    """The interpreter facts of one ELF file, or None when it holds no `_PyRuntime`."""
    elf = ELFFile(stream)
    symbols = _object_symbols(elf, SYMBOLS)
    runtime = symbols.get(b"_PyRuntime")
    if not runtime:
        return None
    loads = tuple(
        LoadSegment(s["p_offset"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_flags"])
        for s in elf.iter_segments()
        if s["p_type"] == "PT_LOAD"
    )
    version = _version(stream, loads, symbols.get(b"Py_Version"), name)
    if version is None:
        return None
    offsets = OFFSETS.get(version)
    if version >= (3, 13):  # the interpreter says where its fields are
        raw = _file_bytes(stream, loads, runtime, DEBUG_OFFSETS_SIZE)
        offsets = (parse_debug_offsets(raw) if raw else None) or offsets
    return InterpreterBinary(version, offsets, runtime, symbols.get(b"PyCode_Type", 0), loads)


def _version(
    stream: IO[bytes], loads: tuple[LoadSegment, ...], py_version: int | None, name: str
) -> tuple[int, int] | None:
    """From Py_Version (3.11+: PY_VERSION_HEX in the file), else from the file name."""
    if py_version:
        raw = _file_bytes(stream, loads, py_version, 4)
        if raw:
            hex_version = struct.unpack("<I", raw)[0]
            return hex_version >> 24, (hex_version >> 16) & 0xFF
    match = CANDIDATE_NAME.match(name)
    if match and match.group(2):
        return int(match.group(1)), int(match.group(2))
    return None


def _file_bytes(
    stream: IO[bytes], loads: tuple[LoadSegment, ...], vaddr: int, size: int
) -> bytes | None:
    for load in loads:
        if load.vaddr <= vaddr and vaddr + size <= load.vaddr + load.filesz:
            stream.seek(vaddr - load.vaddr + load.offset)
            data = stream.read(size)
            return data if len(data) == size else None
    return None


def _object_symbols(elf: ELFFile, names: tuple[bytes, ...]) -> dict[bytes, int]:
    """name -> value of the wanted defined symbols, from .dynsym then .symtab."""
    found: dict[bytes, int] = {}
    layout = struct.Struct("<IBBHQQ")
    for section_name in (".dynsym", ".symtab"):
        section = elf.get_section_by_name(section_name)
        if section is None or section["sh_type"] == "SHT_NOBITS" or elf.elfclass != 64:
            continue
        strings = elf.get_section(section["sh_link"]).data()
        data = section.data()
        for name_offset, _, _, shndx, value, _ in layout.iter_unpack(
            data[: len(data) - len(data) % layout.size]
        ):
            if not value or shndx == 0:
                continue
            end = strings.find(b"\0", name_offset)
            name = strings[name_offset:end]
            if name in names and name not in found:
                found[name] = value
        if len(found) == len(names):
            break
    return found


def _load_bias(
    mappings: tuple[Mapping, ...], path: str, loads: tuple[LoadSegment, ...]
) -> int | None:
    """runtime address - ELF vaddr for the file's mappings (0 for a non-PIE executable)."""
    for mapping in mappings:
        if mapping.path != path:
            continue
        load = load_of(mapping, loads)
        if load is not None:
            return mapping.start - mapping.offset + load.offset - load.vaddr
    return None
