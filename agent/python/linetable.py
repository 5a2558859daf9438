"""Source lines of CPython instructions, decoded from a code object's raw line table.

A profiler samples a Python frame as (code object, instruction position) out of another
process's memory: it cannot call that interpreter's `co_lines()` or `PyCode_Addr2Line`,
and the running agent's own `dis` knows only the agent's CPython version. So the three
table formats are decoded here from bytes, the way the target's C code reads them:

- 3.8, 3.9 `co_lnotab` (Objects/lnotab_notes.txt): (byte increment, signed line
  increment) pairs; a line applies from the address reached before its increment.
- 3.10 `co_linetable`: (byte delta, signed line delta) pairs over [start, end) ranges;
  a line delta of -128 means "no line"; zero-length entries only carry line overflow.
- 3.11 to 3.13 `co_linetable` (Objects/locations.md): one entry per run of code units,
  a head byte (bit 7 set, 4-bit code, length - 1 in code units) then a payload of bytes
  with bit 7 clear: varints, signed varints or raw column bytes.

Positions are what a frame yields (see `line_of`). Garbage never raises: a table that
does not parse (odd length, an odd 3.10 byte delta, a 3.11+ entry without its head bit
or cut short) gives None; 3.8/3.9 pairs of any bytes parse, so there garbage gives lines.
"""

from __future__ import annotations

import bisect
import functools
import sys

# One decoded run: [start, end) in the version's position units, and its line (None: the
# table says these instructions have no line, e.g. 3.11+ artificial ones).
Range = tuple[int, int, int | None]

# 3.8/3.9 tables do not record the bytecode's length: the last line runs to its end.
_OPEN_END = sys.maxsize
_NO_LINE_310 = 0x80  # 3.10 line delta -128
_NO_LOCATION, _LONG, _NO_COLUMNS, _ONE_LINE0 = 15, 14, 13, 10
# CPython writes 32-bit ints: 6 chunks of 6 bits. More is garbage, not a longer number.
_MAX_VARINT_BYTES = 6


def line_of(version: tuple[int, int], firstlineno: int, table: bytes, position: int) -> int | None:
    """The source line of the instruction at `position`, or None when the table has none for it.

    `table` is `co_lnotab` (3.8, 3.9) or `co_linetable` (3.10+). `position` is the frame's
    `f_lasti` in 3.8/3.9 (a byte offset) and 3.10 (a 2-byte code unit index), and the code
    unit index of the executing instruction in 3.11 to 3.13. As CPython's `co_lines()`,
    a position past the table's last range has no line; but 3.8/3.9 tables do not end
    where the bytecode does, so there the last line covers every later position (as
    `PyCode_Addr2Line` answers). Raises ValueError for other CPython versions only.
    """
    ranges = line_ranges(version, firstlineno, table)
    if ranges is None or position < 0:
        return None
    # Ranges are sorted and contiguous from 0: the last one starting at or before position.
    found = bisect.bisect_right(ranges, position, key=lambda run: run[0]) - 1
    if found < 0 or position >= ranges[found][1]:
        return None
    line = ranges[found][2]
    # Only garbage drives a line negative; 3.10's co_lines() reports those as None.
    return line if line is None or line >= 0 else None


# Samples hit the same hot code objects over and over: decode each table once, not per
# sample (a table is decoded whole, so that a malformed one is refused everywhere).
@functools.lru_cache(maxsize=256)
def line_ranges(
    version: tuple[int, int], firstlineno: int, table: bytes
) -> tuple[Range, ...] | None:
    """Every [start, end) position range of the table with its line, in position order;
    None when the table is malformed."""
    if (3, 8) <= version <= (3, 9):
        ranges = _lnotab_ranges(firstlineno, table)
    elif version == (3, 10):
        ranges = _linetable_310_ranges(firstlineno, table)
    elif (3, 11) <= version <= (3, 13):
        ranges = _location_ranges(firstlineno, table)
    else:
        raise ValueError(f"no line table decoder for CPython {version[0]}.{version[1]}")
    return None if ranges is None else tuple(ranges)


def _signed_byte(value: int) -> int:
    return value - 0x100 if value >= 0x80 else value


def _lnotab_ranges(firstlineno: int, table: bytes) -> list[Range] | None:
    if len(table) % 2:
        return None
    ranges: list[Range] = []
    address, line = 0, firstlineno
    for index in range(0, len(table), 2):
        step = table[index]
        # The increment comes first: the line before it holds up to the new address.
        if step:
            ranges.append((address, address + step, line))
            address += step
        line += _signed_byte(table[index + 1])
    ranges.append((address, _OPEN_END, line))
    return ranges


def _linetable_310_ranges(firstlineno: int, table: bytes) -> list[Range] | None:
    if len(table) % 2:
        return None
    ranges: list[Range] = []
    offset, line = 0, firstlineno
    for index in range(0, len(table), 2):
        step, delta = table[index], table[index + 1]
        if step % 2:  # byte deltas of whole 2-byte instructions; positions count those
            return None
        current: int | None = None
        if delta != _NO_LINE_310:  # "no line" leaves the running line as it was
            line += _signed_byte(delta)
            current = line
        # Zero-length entries carry a line delta over 127 on to the next; CPython skips them.
        if step:
            ranges.append((offset // 2, (offset + step) // 2, current))
            offset += step
    return ranges


def _location_ranges(firstlineno: int, table: bytes) -> list[Range] | None:
    ranges: list[Range] = []
    index, unit, line = 0, 0, firstlineno
    while index < len(table):
        head = table[index]
        if not head & 0x80:  # every entry starts with bit 7 set
            return None
        code, length = (head >> 3) & 15, (head & 7) + 1
        parsed = _location_payload(code, table, index + 1)
        if parsed is None:
            return None
        delta, index = parsed
        line += delta
        ranges.append((unit, unit + length, None if code == _NO_LOCATION else line))
        unit += length
    return ranges


def _location_payload(code: int, table: bytes, index: int) -> tuple[int, int] | None:
    """(line delta, index after the payload) of one 3.11+ entry, or None if malformed."""
    if code == _NO_LOCATION:
        return 0, index
    if code in (_LONG, _NO_COLUMNS):
        signed = _varint(table, index)
        if signed is None:
            return None
        value, index = signed
        # Long form: then end line delta, start column + 1, end column + 1 (unused here).
        for _ in range(3 if code == _LONG else 0):
            skipped = _varint(table, index)
            if skipped is None:
                return None
            index = skipped[1]
        return (-(value >> 1) if value & 1 else value >> 1), index
    # One-line forms: line delta in the code, two column bytes; short forms: one byte.
    size, line_delta = (2, code - _ONE_LINE0) if code >= _ONE_LINE0 else (1, 0)
    payload = table[index : index + size]
    if len(payload) < size or any(byte & 0x80 for byte in payload):
        return None
    return line_delta, index + size


def _varint(table: bytes, index: int) -> tuple[int, int] | None:
    """Little-endian 6-bit chunks, bit 6 set on all but the last; (value, next index)."""
    value = 0
    for count in range(_MAX_VARINT_BYTES):
        if index + count >= len(table) or table[index + count] & 0x80:
            return None
        byte = table[index + count]
        value |= (byte & 0x3F) << (6 * count)
        if not byte & 0x40:
            return value, index + count + 1
    return None
