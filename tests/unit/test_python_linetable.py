"""line_of against the real interpreters: pyenv's CPython 3.8 to 3.13 and Debian's 3.11.

Each interpreter compiles a varied module (loops, a function over 300 lines, line jumps of
+/-200 and +3000 lines, lines of over 255 bytecode bytes and 127 columns, comprehensions,
try/except/finally, decorators, lambdas, generators, async, multi-line expressions, lines
without code, and the syntax of newer versions: match, except*, type parameters), then
prints, for every code object recursively, co_firstlineno, the raw line table and the line
of every instruction position as the profiler reads positions from frames (byte offsets of
f_lasti in 3.8/3.9, 2-byte code unit indexes from 3.10). Truth is CPython's own answer:
`dis.findlinestarts` (3.8, 3.9) or `co_lines()` (3.10+); line_of must give it everywhere.
Two more CPython answers are checked to agree with it, so the truth is not one tool's
quirk: `PyCode_Addr2Line` (the C function behind tracebacks and f_lineno; -1 = no line)
through ctypes, and, from 3.11, the start line of `co_positions()` for every code unit.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.python.linetable import line_of, line_ranges

# Run in the target interpreter (3.8 syntax); reads the module's source on stdin.
GENERATOR = r"""
import bisect, ctypes, dis, json, sys, types

addr2line = ctypes.pythonapi.PyCode_Addr2Line
addr2line.argtypes = [ctypes.py_object, ctypes.c_int]
addr2line.restype = ctypes.c_int
OLD = sys.version_info < (3, 10)

def walk(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from walk(const)

def truth(code):
    units = len(code.co_code) // 2
    if OLD:  # line of an offset: that of the last line start at or before it
        starts = list(dis.findlinestarts(code))
        offsets = [offset for offset, _ in starts]
        return [starts[bisect.bisect_right(offsets, 2 * unit) - 1][1] for unit in range(units)]
    lines = [None] * units
    for start, end, line in code.co_lines():
        for offset in range(start, end, 2):
            lines[offset // 2] = line
    return lines

def record(code):
    units = len(code.co_code) // 2
    c_lines = [addr2line(code, 2 * unit) for unit in range(units)]
    entry = {
        "name": code.co_name,
        "firstlineno": code.co_firstlineno,
        "table": (code.co_lnotab if OLD else code.co_linetable).hex(),
        "lines": truth(code),
        "addr2line": [None if line == -1 else line for line in c_lines],
    }
    if sys.version_info >= (3, 11):
        entry["positions"] = [position[0] for position in code.co_positions()]
    return entry

module = compile(sys.stdin.read(), "sample.py", "exec")
print(json.dumps([record(code) for code in walk(module)]))
"""

COMMON_SOURCE = '''\
"""Module docstring."""
import os

CONSTANT = 1  # a comment


def simple(a, b):
    # a line with no code

    c = a + b
    return c


def loops(n):
    total = 0
    for i in range(n):
        if i % 2:
            total += i
        elif i % 3:
            continue
        else:
            total -= 1
    while total > 0:
        total -= 3
        if total == 7:
            break
    else:
        total = None
    return total


def comprehensions(xs):
    a = [x * 2 for x in xs if x]
    b = {x: x for x in xs}
    c = {x for x in xs}
    d = (x for x in xs)
    return [
        y
        for y in a
        if y
    ], b, c, d


def handlers(f):
    try:
        f()
    except (ValueError, TypeError) as exc:
        return exc
    except Exception:
        raise
    else:
        pass
    finally:
        f()
    with open(f) as g, open(f) as h:
        return g, h


def decorator(fn):
    return fn


@decorator
@decorator
def decorated(
    x,
    y=lambda z: z + 1,
    *args,
    **kwargs
):
    assert x, "message"
    global CONSTANT
    del args
    return (lambda: x)()


class Klass(object):
    """Class docstring."""
    attr = 1

    @property
    def prop(self):
        return self.attr

    async def coroutine(self):
        await self.prop
        async for x in self:
            pass
        async with self:
            pass
        return [x async for x in self]


def generator():
    yield 1
    yield from range(3)
    x = yield
    return x


def multiline(a, b):
    value = call(
        a,
        b,
    ) + other(
        [1,
         2],
    )
    text = (
        "implicit"
        f"{a!r:>{b}}"
        "concatenation"
    )
    return value if a else text


def closures():
    counter = 0
    def inner():
        nonlocal counter
        counter += 1
        def innermost():
            return counter
        return innermost
    return inner
'''

VERSION_SOURCE = {
    (3, 10): """
def matching(command):
    match command:
        case [x, y, *rest] if x > y:
            return rest
        case {"key": value, **others}:
            return value
        case Klass(attr=1) | None:
            return 0
        case _:
            return None
""",
    (3, 11): """
def groups(f):
    try:
        f()
    except* ValueError as group:
        f(group)
    except* TypeError:
        pass
    return f
""",
    (3, 12): """
def generic[T: int, *Ts, **P](x: T) -> T:
    return x

type Alias[K] = dict[K, list[K]]

class Box[T]:
    def get(self) -> T:
        return self.item
""",
}


def generated_source() -> str:
    """Parts whose size is the point: deltas that overflow every format's fields."""
    long_body = "".join(f"    v{i} = v{i - 1} + {i}\n" if i % 7 else "\n" for i in range(1, 400))
    wide = ", ".join(f"name{i}" for i in range(300))
    spread = "".join(f"        arg{i},\n" if i % 50 == 0 else "\n" for i in range(200))
    return (
        f"def long_function(v0):\n{long_body}    return v0\n\n\n"
        # Lines 200 and 3000 apart: lnotab/3.10 split entries, multi-chunk varints.
        "def jumps(x):\n    x += 1\n"
        + "\n" * 200
        + "    x += 2\n"
        + "\n" * 3000
        + "    x += 3\n    for i in x:\n        i += 1\n"
        + "\n" * 200
        + "        i += 2\n    return x\n\n\n"  # the loop jumps back 200 lines
        # Over 255 bytecode bytes and 127 columns on one line.
        f"def wide():\n    x = [{wide}]\n    return x\n\n\n"
        # A call spanning 200 lines: its CALL goes back to the first line.
        f"def spread():\n    return function(\n{spread}    )\n\n\n"
        + "\n" * 20000  # a function starting at line ~24000
        + "def far():\n    return 1\n"
    )


def sample_source(version: tuple[int, int]) -> str:
    extras = [source for since, source in VERSION_SOURCE.items() if version >= since]
    return COMMON_SOURCE + generated_source() + "".join(extras)


def pyenv_root() -> Path:
    pyenv = shutil.which("pyenv")
    if pyenv:
        found = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip():
            return Path(found.stdout.strip())
    return Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))


def interpreter(name: str) -> Path:
    """The interpreter, by full path; missing, it fails in CI (STROBE_REQUIRE_BPF=1)."""
    if name.startswith("/"):
        path = Path(name)
    else:
        short = ".".join(name.split(".")[:2])
        path = pyenv_root() / "versions" / name / "bin" / f"python{short}"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = f"no CPython interpreter at {path}"
    if os.environ.get("STROBE_REQUIRE_BPF") == "1":
        pytest.fail(f"STROBE_REQUIRE_BPF=1 but {reason}")
    pytest.skip(reason)


@functools.cache
def code_objects(python: Path) -> tuple[tuple[int, int], list[dict[str, Any]]]:
    version_text = subprocess.run(
        [str(python), "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    major, minor = map(int, version_text.split())
    version = (major, minor)
    run = subprocess.run(
        [str(python), "-I", "-c", GENERATOR],
        input=sample_source(version),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, f"{python}: {run.stderr}"
    return version, json.loads(run.stdout)


def position(version: tuple[int, int], unit: int) -> int:
    """What the frame holds for code unit `unit`: f_lasti is a byte offset before 3.10."""
    return 2 * unit if version < (3, 10) else unit


INTERPRETERS = ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0", "/usr/bin/python3.11"]


@pytest.mark.parametrize("name", INTERPRETERS)
def test_line_of_agrees_with_cpython(name: str) -> None:
    version, codes = code_objects(interpreter(name))
    assert version in {(3, 8), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13)}
    assert len(codes) > 25 and any(code["name"] == "long_function" for code in codes)
    checked, wrong = 0, []
    for code in codes:
        table = bytes.fromhex(code["table"])
        assert line_ranges(version, code["firstlineno"], table) is not None, code["name"]
        for unit, expected in enumerate(code["lines"]):
            got = line_of(version, code["firstlineno"], table, position(version, unit))
            checked += 1
            if got != expected:
                wrong.append(f"{code['name']} unit {unit}: line_of {got}, CPython {expected}")
        after = position(version, len(code["lines"]))
        past_end = line_of(version, code["firstlineno"], table, after)
        # co_lines() stops at the bytecode's end; a 3.8/3.9 lnotab does not know where
        # that is, and PyCode_Addr2Line answers the last line there: so does line_of.
        assert past_end == (code["lines"][-1] if version < (3, 10) else None), code["name"]
        assert line_of(version, code["firstlineno"], table, -1) is None
    print(f"{name}: {len(codes)} code objects, {checked - len(wrong)}/{checked} positions agree")
    assert not wrong, "\n".join(wrong[:20])


@pytest.mark.parametrize("name", INTERPRETERS)
def test_cpython_line_tools_agree(name: str) -> None:
    """The truth above is no quirk of one tool: CPython's other answers give it too."""
    version, codes = code_objects(interpreter(name))
    for code in codes:
        assert code["addr2line"] == code["lines"], code["name"]
        if version >= (3, 11):
            assert code["positions"] == code["lines"], code["name"]


def entry_forms(version: tuple[int, int], table: bytes) -> Counter[str]:
    """The table's encodings that take care to decode: overflow splits, no-line entries,
    and every 3.11+ entry kind (whose payload bytes never have bit 7 set)."""
    if version >= (3, 11):
        names = {15: "none", 14: "long", 13: "no-columns", 12: "one-line"}
        names |= {11: "one-line", 10: "one-line"}
        heads = (byte for byte in table if byte & 0x80)
        return Counter(names.get((head >> 3) & 15, "short") for head in heads)
    forms: Counter[str] = Counter()
    for step, delta in zip(table[::2], table[1::2], strict=True):
        forms["step split"] += step == (255 if version < (3, 10) else 254)
        forms["line split"] += step == 0 and delta in (127, 0x81 if version == (3, 10) else 0x80)
        forms["line back"] += delta > 0x80
        forms["no line"] += version == (3, 10) and delta == 0x80
    return forms


@pytest.mark.parametrize("name", INTERPRETERS[:-1])
def test_corpus_covers_table_encodings(name: str) -> None:
    version, codes = code_objects(interpreter(name))
    forms: Counter[str] = Counter()
    for code in codes:
        forms += entry_forms(version, bytes.fromhex(code["table"]))
    expected = {"step split", "line split", "line back"} | (
        {"no line"} if version == (3, 10) else set()
    )
    if version >= (3, 11):
        expected = {"none", "long", "no-columns", "one-line", "short"}
    assert expected <= set(forms), forms


def test_lnotab_by_hand() -> None:
    # (4 bytes, +1) (255, 0) (3, +127) (0, -128 + 0x100 = 0x80): lines by byte offset.
    table = bytes([4, 1, 255, 0, 3, 127, 0, 0x80])
    assert [line_of((3, 8), 10, table, offset) for offset in (0, 2, 4, 260, 262)] == [
        10,
        10,
        11,
        11,
        10,
    ]
    assert line_of((3, 9), 10, table, 10_000) == 10  # the last line, to the end
    assert line_of((3, 8), 10, table[:-1], 0) is None  # odd length
    assert line_of((3, 8), 10, b"", 0) == 10


def test_linetable_310_by_hand() -> None:
    # (0, +127) carries over to (6 bytes, +3): line 140 for units 0-2; then no line for
    # 2 units; then (254, 0) and (2, 0): line 140 again up to unit 133.
    table = bytes([0, 127, 6, 3, 4, 0x80, 254, 0, 2, 0])
    assert [line_of((3, 10), 10, table, unit) for unit in (0, 2, 3, 4, 5, 132, 133)] == [
        140,
        140,
        None,
        None,
        140,
        140,
        None,
    ]
    assert line_of((3, 10), 10, bytes([3, 1]), 0) is None  # odd byte delta


def head(code: int, length: int) -> int:
    return 0x80 | (code << 3) | (length - 1)


def test_location_forms() -> None:
    table = bytes(
        [head(0, 2), 0x05]  # short form: same line (1000), 2 units
        + [head(11, 1), 4, 9]  # one-line form, +1: 1001
        + [head(13, 3), 0x41, 0x01]  # no columns, signed varint 65 = -32: 969
        + [head(15, 1)]  # no location
        + [head(14, 8), 0x20, 0x03, 0x01, 0x05]  # long form, +16: 985
        + [head(12, 1), 0, 1]  # one-line form, +2: 987
    )
    lines = [line_of((3, 12), 1000, table, unit) for unit in range(17)]
    assert lines == [1000, 1000, 1001, 969, 969, 969, None] + [985] * 8 + [987, None]
    for broken in (table[:-1], table[1:], table + bytes([head(14, 1), 0x41]), b"\x05"):
        assert line_of((3, 11), 1000, broken, 0) is None
    assert line_of((3, 13), 1, b"", 0) is None


def test_unsupported_version_is_an_error() -> None:
    with pytest.raises(ValueError):
        line_of((3, 14), 1, b"", 0)


def test_garbage_never_raises() -> None:
    """Random and mutated tables, any position: an int or None, never an exception."""
    rng = random.Random(20240601)
    real = [code.co_linetable for code in _own_code_objects()]
    for _ in range(4000):
        if rng.random() < 0.5:
            table = rng.randbytes(rng.randrange(0, 64))
        else:  # real 3.11 tables, truncated or with bytes flipped: deeper paths
            mutable = bytearray(rng.choice(real)[: rng.randrange(1, 200)])
            for _ in range(rng.randrange(1, 4)):
                mutable[rng.randrange(len(mutable))] = rng.randrange(256)
            table = bytes(mutable)
        version = rng.choice([(3, 8), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13)])
        firstlineno = rng.choice([0, 1, 1000, -5])
        for where in (-1, 0, rng.randrange(1 << 12), 1 << 40):
            line = line_of(version, firstlineno, table, where)
            assert line is None or (isinstance(line, int) and line >= 0)


def _own_code_objects() -> list[Any]:
    stack, found = [compile(COMMON_SOURCE, "sample.py", "exec")], []
    while stack:
        code = stack.pop()
        found.append(code)
        stack.extend(c for c in code.co_consts if isinstance(c, type(code)))
    assert sys.version_info >= (3, 11)
    return found
