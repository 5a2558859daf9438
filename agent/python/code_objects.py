"""CPython code objects read out of a live process: name, qualified name, file, first
line and line table, cached per (pid, address).

The BPF walker reports each code object the first time a process runs it, so it is
read while the process lives (a 0.5 s process included). An address can be reused
by another code object after the first is freed: a cached entry is checked against
the process's memory again once per window before it names a frame.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from agent.python.interpreter import Interpreter
from agent.python.linetable import line_of
from agent.python.memory import read_memory
from agent.python.offsets import PythonOffsets

MAX_CODE_OBJECTS = 65_536
MAX_STRING_CHARS = 1024
MAX_LINE_TABLE = 1 << 16
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
KIND_SHIFT, COMPACT_BIT, ASCII_BIT = 2, 5, 6  # PyASCIIObject.state, 3.8-3.13
ENCODINGS = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}


@dataclass(frozen=True, slots=True)
class CodeInfo:
    name: str  # co_qualname where the version has it, else co_name
    filename: str
    firstlineno: int
    linetable: bytes
    identity: bytes  # the fields that tell this code object from a later one at its address

    def line(self, interpreter: Interpreter, position: int) -> int | None:
        """The line at the walker's position (see bpf/profile.bpf.c), or None."""
        offsets = interpreter.offsets
        if offsets.code_code_adaptive >= 0:  # 3.11+: code units from the object's start
            position -= offsets.code_code_adaptive // 2
            if position < 0:
                return None  # a frame not started yet
        return line_of(interpreter.version, self.firstlineno, self.linetable, position)


def _header_size(offsets: PythonOffsets) -> int:
    fields = (
        offsets.code_filename,
        offsets.code_name,
        offsets.code_qualname,
        offsets.code_firstlineno,
        offsets.code_linetable,
    )
    return max(fields) + 8


def read_code(pid: int, address: int, interpreter: Interpreter) -> CodeInfo | None:
    """The code object at `address`, or None when it is not one (or is unreadable)."""
    offsets = interpreter.offsets
    header = read_memory(pid, address, _header_size(offsets))
    if header is None:
        return None
    if interpreter.code_type and _U64.unpack_from(header, 8)[0] != interpreter.code_type:
        return None  # not a code object (freed, or the offsets are wrong for this build)
    name_field = offsets.code_qualname if offsets.code_qualname >= 0 else offsets.code_name
    name = read_string(pid, _U64.unpack_from(header, name_field)[0], offsets)
    filename = read_string(pid, _U64.unpack_from(header, offsets.code_filename)[0], offsets)
    table = read_bytes(pid, _U64.unpack_from(header, offsets.code_linetable)[0], offsets)
    if name is None or filename is None or table is None:
        return None
    firstlineno = _I32.unpack_from(header, offsets.code_firstlineno)[0]
    return CodeInfo(name, filename, firstlineno, table, identity(header, offsets))


def identity(header: bytes, offsets: PythonOffsets) -> bytes:
    """Type, name, file, line table pointers and first line: what a reuse would change."""
    fields = (8, offsets.code_name, offsets.code_filename, offsets.code_linetable)
    first = offsets.code_firstlineno
    return b"".join(header[f : f + 8] for f in fields) + header[first : first + 4]


def read_string(pid: int, address: int, offsets: PythonOffsets) -> str | None:
    """A compact str object's text (every identifier and file name is one)."""
    head = read_memory(pid, address, offsets.unicode_state + 4)
    if head is None:
        return None
    length = _U64.unpack_from(head, 16)[0]
    state = _U32.unpack_from(head, offsets.unicode_state)[0]
    kind = (state >> KIND_SHIFT) & 7
    if not (state >> COMPACT_BIT) & 1 or kind not in ENCODINGS:
        return None
    length = min(length, MAX_STRING_CHARS)
    ascii_only = (state >> ASCII_BIT) & 1
    start = offsets.unicode_ascii_data if ascii_only else offsets.unicode_compact_data
    data = read_memory(pid, address + start, length * kind) if length else b""
    if data is None:
        return None
    return data.decode(ENCODINGS[kind], "replace")


def read_bytes(pid: int, address: int, offsets: PythonOffsets) -> bytes | None:
    size_raw = read_memory(pid, address + offsets.bytes_size, 8)
    if size_raw is None:
        return None
    size = _U64.unpack(size_raw)[0]
    if size > MAX_LINE_TABLE:
        return None
    return read_memory(pid, address + offsets.bytes_data, size) if size else b""


class CodeObjects:
    """Code objects by (pid, address), bounded, least recently used dropped first."""

    def __init__(self, max_entries: int = MAX_CODE_OBJECTS) -> None:
        self._entries: OrderedDict[tuple[int, int], CodeInfo | None] = OrderedDict()
        self._checked: set[tuple[int, int]] = set()  # verified in this window
        self._max_entries = max_entries
        self.reads = 0
        self.failures = 0

    def note(self, pid: int, address: int, interpreter: Interpreter) -> None:
        """Read a code object the walker just met, unless it is known."""
        key = (pid, address)
        if key not in self._entries:
            self._read(key, interpreter)
            self._checked.add(key)

    def get(self, pid: int, address: int, interpreter: Interpreter) -> CodeInfo | None:
        """The code object, checked against the process once per window; None when
        it can't be read (then the frame is named by its address)."""
        key = (pid, address)
        if key in self._checked:
            self._entries.move_to_end(key)
            return self._entries.get(key)
        self._checked.add(key)
        known = self._entries.get(key)
        if known is not None and self._same(pid, address, known, interpreter):
            self._entries.move_to_end(key)
            return known
        return self._read(key, interpreter)

    def end_window(self) -> None:
        self._checked.clear()

    def forget(self, pid: int) -> None:
        for key in [key for key in self._entries if key[0] == pid]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def _same(self, pid: int, address: int, known: CodeInfo, interpreter: Interpreter) -> bool:
        header = read_memory(pid, address, _header_size(interpreter.offsets))
        # Unreadable: the process exited; what was read while it ran still names it.
        return header is None or identity(header, interpreter.offsets) == known.identity

    def _read(self, key: tuple[int, int], interpreter: Interpreter) -> CodeInfo | None:
        self.reads += 1
        info = read_code(key[0], key[1], interpreter)
        if info is None:
            self.failures += 1
        self._entries[key] = info
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return info
