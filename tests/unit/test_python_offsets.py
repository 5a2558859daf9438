"""agent.python.offsets against real CPython builds: DWARF and live processes.

Why both: DWARF (gdb on the pyenv builds' libpython) pins every number of the table, so
a typo fails; walking live interpreters through /proc/PID/mem the way the profiler does
(_PyRuntime -> interpreter -> thread states -> frames -> code objects -> str/bytes)
proves the offsets mean what the profiler assumes, also for Debian's python3.11, which
has no DWARF. Missing interpreters, gdb or root skip, but fail when STROBE_REQUIRE_BPF=1.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import struct
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NoReturn

import pytest
from elftools.elf.elffile import ELFFile

from agent.python.offsets import (
    DEBUG_COOKIE,
    DEBUG_OFFSET_POSITIONS,
    DEBUG_OFFSETS_SIZE,
    GLIBC_X86_64_PTHREAD_TID,
    NONE,
    OFFSETS,
    UNICODE_ASCII_BIT,
    UNICODE_COMPACT_BIT,
    UNICODE_KIND_MASK,
    UNICODE_KIND_SHIFT,
    UNICODE_LENGTH,
    PythonOffsets,
    parse_debug_offsets,
)

VERSIONS = sorted(OFFSETS)
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
DEBIAN_PYTHON = Path("/usr/bin/python3.11")
REQUIRE = os.environ.get("STROBE_REQUIRE_BPF") == "1"


def unavailable(reason: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"STROBE_REQUIRE_BPF=1 but {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class Build:
    python: Path  # the interpreter to run
    image: Path  # the ELF file that defines _PyRuntime (libpython, or the executable)


def pyenv_build(version: tuple[int, int]) -> Build | None:
    """The newest pyenv release build of a minor version (not a -dev or free-threaded one)."""
    minor = f"{version[0]}.{version[1]}"
    try:  # an unreadable pyenv root (another user's home) is as good as none
        found = [d for d in PYENV_VERSIONS.iterdir() if re.fullmatch(rf"{minor}\.\d+", d.name)]
    except OSError:
        return None
    for root in sorted(found, key=lambda d: int(d.name.rsplit(".", 1)[1]), reverse=True):
        python, lib = root / "bin" / f"python{minor}", root / "lib" / f"libpython{minor}.so.1.0"
        if python.exists() and lib.exists():
            return Build(python, lib)
    return None


def require_pyenv_build(version: tuple[int, int]) -> Build:
    build = pyenv_build(version)
    if build is None:
        unavailable(f"no pyenv build of Python {version[0]}.{version[1]} in {PYENV_VERSIONS}")
    return build


# --- reading another process ---------------------------------------------------------


class Mem:
    """Reads of a live process's memory, as the profiler's /proc/PID/mem path does."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, address: int, size: int) -> bytes:
        data = os.pread(self.fd, size, address)
        assert len(data) == size, f"short read at {address:#x}"
        return data

    def u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def i64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little", signed=True)

    def u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def i32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little", signed=True)

    def u8(self, address: int) -> int:
        return self.read(address, 1)[0]


def symbol_and_first_load(image: Path, name: str) -> tuple[int, int, bytes]:
    """(st_value of `name` in .dynsym, lowest PT_LOAD vaddr, its initial bytes if in .data)."""
    with image.open("rb") as f:
        elf = ELFFile(f)
        dynsym = elf.get_section_by_name(".dynsym")
        assert dynsym is not None, f"{image} has no .dynsym"
        symbol = dynsym.get_symbol_by_name(name)[0]  # type: ignore[attr-defined]
        value, size = symbol["st_value"], symbol["st_size"]
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        first = min(s["p_vaddr"] for s in loads)
        for segment in loads:  # a .bss symbol (3.8, 3.9: zero-initialized) has no file bytes
            if segment["p_vaddr"] <= value < segment["p_vaddr"] + segment["p_filesz"]:
                f.seek(segment["p_offset"] + value - segment["p_vaddr"])
                return value, first, f.read(size)
        return value, first, b""


def runtime_address(pid: int, image: Path) -> int:
    """_PyRuntime's address: symbol value + load bias (the mapping at file offset 0)."""
    value, first_vaddr, _ = symbol_and_first_load(image, "_PyRuntime")
    real = os.path.realpath(image)
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == real and int(parts[2], 16) == 0:
            start = int(parts[0].split("-")[0], 16)
            return start - (first_vaddr & ~0xFFF) + value
    raise AssertionError(f"{real} is not mapped in {pid}")


# The main thread spins in Spinner.inner <- outer <- <module>; a second thread sleeps in a
# function whose name is not ASCII (kind 2: a UCS-2 char), to check compact str data.
SCRIPT = """\
import json
import sys
import threading
import time

worker_running = False


def wörk_λ():
    global worker_running
    worker_running = True  # no Python call before sleep: wörk_λ stays the top frame
    while True:
        time.sleep(0.05)


class Spinner:
    def inner(self):
        code = Spinner.inner.__code__
        table = code.co_lnotab if sys.version_info < (3, 10) else code.co_linetable
        facts = {
            "filename": code.co_filename,
            "firstlineno": code.co_firstlineno,
            "linetable": table.hex(),
            "code_len": len(code.co_code),
            "code_id": id(code),
            "frame_id": id(sys._getframe()),
            "thread_id": threading.get_ident(),
        }
        print(json.dumps(facts), flush=True)
        n = 0
        while True:
            n += 1


def outer():
    Spinner().inner()


threading.Thread(target=wörk_λ, daemon=True).start()
while not worker_running:
    time.sleep(0.001)
outer()
"""


@contextmanager
def spinning(python: Path, script: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """Run the script; yield (pid, the facts it printed) once it spins in Spinner.inner."""
    process = subprocess.Popen(
        [str(python), "-I", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        line = process.stdout.readline() if ready else b""
        if not line:
            process.kill()
            raise AssertionError(f"{python} did not start: {process.communicate()[1]!r}")
        yield process.pid, json.loads(line)
    finally:
        process.kill()
        process.communicate()


def read_str(mem: Mem, off: PythonOffsets, obj: int) -> tuple[str, bool]:
    """A compact str object's text and whether it is compact ASCII."""
    state = mem.u32(obj + off.unicode_state)
    kind = (state >> UNICODE_KIND_SHIFT) & UNICODE_KIND_MASK
    is_ascii = bool(state >> UNICODE_ASCII_BIT & 1)
    assert state >> UNICODE_COMPACT_BIT & 1, f"str at {obj:#x} is not compact"
    assert kind in (1, 2, 4) and (kind == 1 or not is_ascii), f"state {state:#x}"
    length = mem.i64(obj + UNICODE_LENGTH)
    assert 0 <= length < 4096
    data = obj + (off.unicode_ascii_data if is_ascii else off.unicode_compact_data)
    text = mem.read(data, length * kind).decode(
        {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    )
    assert mem.read(data + length * kind, kind) == bytes(kind), "compact str is NUL-terminated"
    return text, is_ascii


def read_bytes(mem: Mem, off: PythonOffsets, obj: int) -> bytes:
    size = mem.i64(obj + off.bytes_size)
    assert 0 <= size < 1 << 20
    assert mem.u8(obj + off.bytes_data + size) == 0, "ob_sval is NUL-terminated"
    return mem.read(obj + off.bytes_data, size)


def thread_states(mem: Mem, off: PythonOffsets, runtime: int) -> list[int]:
    interp = mem.u64(runtime + off.runtime_interpreters_head)
    assert interp, "no interpreter"
    states: list[int] = []
    tstate = mem.u64(interp + off.interp_threads_head)
    while tstate and len(states) < 64:
        assert mem.u64(tstate + off.tstate_interp) == interp
        states.append(tstate)
        tstate = mem.u64(tstate + off.tstate_next)
    return states


def kernel_tid(mem: Mem, off: PythonOffsets, tstate: int) -> int:
    """native_thread_id, or (3.8-3.10) the tid in glibc's struct pthread at thread_id."""
    from_pthread = mem.i32(mem.u64(tstate + off.tstate_thread_id) + GLIBC_X86_64_PTHREAD_TID)
    if off.tstate_native_thread_id != NONE:
        native = mem.u64(tstate + off.tstate_native_thread_id)
        assert native == from_pthread, "glibc pthread tid offset disagrees with CPython"
    return from_pthread


def frames(mem: Mem, off: PythonOffsets, tstate: int) -> list[int]:
    """The thread's frames, innermost first, without 3.12+ C-stack shim frames."""
    frame = mem.u64(tstate + off.tstate_frame)
    if off.cframe_current_frame != NONE and frame:
        frame = mem.u64(frame + off.cframe_current_frame)
    out: list[int] = []
    while frame and len(out) < 64:
        shim = (
            off.owned_by_cstack != NONE and mem.u8(frame + off.frame_owner) == off.owned_by_cstack
        )
        if not shim:
            out.append(frame)
        frame = mem.u64(frame + off.frame_previous)
    return out


def code_names(mem: Mem, off: PythonOffsets, chain: list[int]) -> list[tuple[str, bool]]:
    return [read_str(mem, off, mem.u64(mem.u64(f + off.frame_code) + off.code_name)) for f in chain]


def check_inner_code(mem: Mem, off: PythonOffsets, code: int, facts: dict[str, object]) -> None:
    assert code == facts["code_id"], "f_code/f_executable is the inner code object"
    assert read_str(mem, off, mem.u64(code + off.code_filename)) == (facts["filename"], True)
    assert mem.i32(code + off.code_firstlineno) == facts["firstlineno"]
    linetable = read_bytes(mem, off, mem.u64(code + off.code_linetable))
    assert linetable.hex() == facts["linetable"] and linetable
    if off.code_qualname != NONE:
        assert read_str(mem, off, mem.u64(code + off.code_qualname)) == ("Spinner.inner", True)


def check_main_frames(
    mem: Mem, off: PythonOffsets, chain: list[int], facts: dict[str, object]
) -> None:
    assert code_names(mem, off, chain) == [("inner", True), ("outer", True), ("<module>", True)]
    inner, code = chain[0], mem.u64(chain[0] + off.frame_code)
    check_inner_code(mem, off, code, facts)
    code_len = int(str(facts["code_len"]))
    if off.code_code_adaptive == NONE:  # f_lasti: an int index into co_code
        assert inner == facts["frame_id"], "3.8-3.10 frames are the frame objects"
        assert 0 <= mem.i32(inner + off.frame_instr) < code_len
    else:  # a pointer into the bytecode inline in the code object (3.11/3.12: may be -1 unit)
        start = code + off.code_code_adaptive
        assert start - 2 <= mem.u64(inner + off.frame_instr) < start + code_len
        assert [mem.u8(f + off.frame_owner) for f in chain] == [0, 0, 0]  # FRAME_OWNED_BY_THREAD
    if off.frame_is_entry != NONE:  # only <module> was entered from C
        assert [mem.u8(f + off.frame_is_entry) for f in chain] == [0, 0, 1]


def check_live(build: Build, version: tuple[int, int], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("reading another process's memory needs root")
    off = OFFSETS[version]
    script = tmp_path / "spin.py"
    script.write_text(SCRIPT, encoding="utf-8")
    with spinning(build.python, script) as (pid, facts):
        mem = Mem(pid)
        try:
            runtime = runtime_address(pid, build.image)
            if version >= (3, 13):
                raw = mem.read(runtime, DEBUG_OFFSETS_SIZE)
                assert raw[:8] == DEBUG_COOKIE and parse_debug_offsets(raw) == off
            by_tid = {kernel_tid(mem, off, t): t for t in thread_states(mem, off, runtime)}
            assert set(by_tid) == {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            main = by_tid.pop(pid)
            assert mem.u64(main + off.tstate_thread_id) == facts["thread_id"]
            assert facts["filename"] == str(script)
            check_main_frames(mem, off, frames(mem, off, main), facts)
            (worker,) = by_tid.values()
            worker_names = [name for name, _ in code_names(mem, off, frames(mem, off, worker))]
            assert worker_names[0] == "wörk_λ" and worker_names[-1] == "_bootstrap"
        finally:
            mem.close()


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
def test_walks_a_live_pyenv_interpreter(version: tuple[int, int], tmp_path: Path) -> None:
    check_live(require_pyenv_build(version), version, tmp_path)


def test_walks_debian_python311_with_the_311_table(tmp_path: Path) -> None:
    if not DEBIAN_PYTHON.exists():
        unavailable(f"{DEBIAN_PYTHON} is not installed")
    # Debian links libpython into the executable: _PyRuntime is in its .dynsym.
    check_live(Build(DEBIAN_PYTHON, DEBIAN_PYTHON), (3, 11), tmp_path)


# --- DWARF ---------------------------------------------------------------------------


def dwarf_expressions(version: tuple[int, int]) -> dict[str, str]:
    """gdb expressions for each field; a NONE field's must not evaluate (member absent)."""
    old, v313 = version < (3, 11), version >= (3, 13)
    frame = "(PyFrameObject*)0" if old else "(struct _PyInterpreterFrame*)0"
    tstate, code = "((PyThreadState*)0)", "((PyCodeObject*)0)"
    return {
        "runtime_interpreters_head": "&((_PyRuntimeState*)0)->interpreters.head",
        "interp_threads_head": "&((PyInterpreterState*)0)->"
        + ("tstate_head" if old else "threads.head"),
        "tstate_next": f"&{tstate}->next",
        "tstate_interp": f"&{tstate}->interp",
        "tstate_thread_id": f"&{tstate}->thread_id",
        "tstate_native_thread_id": f"&{tstate}->native_thread_id",
        "tstate_frame": f"&{tstate}->"
        + ("frame" if old else "current_frame" if v313 else "cframe"),
        "cframe_current_frame": "&((_PyCFrame*)0)->current_frame",
        "frame_previous": f"&({frame})->" + ("f_back" if old else "previous"),
        "frame_code": f"&({frame})->" + ("f_executable" if v313 else "f_code"),
        "frame_instr": f"&({frame})->"
        + ("f_lasti" if old else "instr_ptr" if v313 else "prev_instr"),
        "frame_owner": f"&({frame})->owner",
        "frame_is_entry": f"&({frame})->is_entry",
        "code_filename": f"&{code}->co_filename",
        "code_name": f"&{code}->co_name",
        "code_qualname": f"&{code}->co_qualname",
        "code_firstlineno": f"&{code}->co_firstlineno",
        "code_linetable": f"&{code}->" + ("co_lnotab" if version < (3, 10) else "co_linetable"),
        "code_code_adaptive": f"&{code}->co_code_adaptive",
        "unicode_state": "&((PyASCIIObject*)0)->state",
        "unicode_ascii_data": "sizeof(PyASCIIObject)",
        "unicode_compact_data": "sizeof(PyCompactUnicodeObject)",
        "bytes_size": "&((PyBytesObject*)0)->ob_base.ob_size",
        "bytes_data": "&((PyBytesObject*)0)->ob_sval",
        "owned_by_cstack": "FRAME_OWNED_BY_CSTACK",
        "UNICODE_LENGTH": "&((PyASCIIObject*)0)->length",
    }


def expected_width(field: str, version: tuple[int, int]) -> int:
    """sizeof the member each field names (the reader's load width)."""
    widths = {"frame_owner": 1, "frame_is_entry": 1, "code_firstlineno": 4, "unicode_state": 4}
    widths |= {"bytes_data": 1, "code_code_adaptive": 1}  # char ob_sval[1], co_code_adaptive[1]
    widths["frame_instr"] = 4 if version < (3, 11) else 8  # int f_lasti / _Py_CODEUNIT*
    return widths.get(field, 8)


def debug_layout_expressions() -> dict[str, str]:
    exprs = {f"debug.{n}": f"&((_Py_DebugOffsets*)0)->{n}" for n in DEBUG_OFFSET_POSITIONS}
    return exprs | {"debug.SIZE": "sizeof(_Py_DebugOffsets)"}


@dataclass(frozen=True)
class Dwarf:
    values: dict[str, int]  # expression name -> value (offsets via "off:", widths "size:")
    ascii_object: str  # gdb's `ptype /o PyASCIIObject`


def run_gdb(lib: Path, exprs: dict[str, str]) -> Dwarf:
    # One gdb per build, every expression in it: gdb prints nothing after the marker when
    # an expression does not evaluate (the member does not exist in that version).
    args = ["gdb", "-batch", "-nx"]
    for name, expr in exprs.items():
        args += ["-ex", f"echo @off:{name}=", "-ex", f"output (long)({expr})", "-ex", "echo \\n"]
        if expr.startswith("&"):
            size = f"sizeof({expr[1:]})"
            args += ["-ex", f"echo @size:{name}=", "-ex", f"output {size}", "-ex", "echo \\n"]
    args += ["-ex", "echo @ptype\\n", "-ex", "ptype /o PyASCIIObject"]
    out = subprocess.run([*args, str(lib)], capture_output=True, text=True, timeout=60).stdout
    values = {f"{k}:{n}": int(v) for k, n, v in re.findall(r"@(off|size):([\w.]+)=(-?\d+)", out)}
    return Dwarf(values, out.partition("@ptype\n")[2])


@pytest.fixture(scope="module")
def dwarf() -> dict[tuple[int, int], Dwarf]:
    """gdb's answers for every pyenv build present, run in parallel (about a second)."""
    if shutil.which("gdb") is None:
        unavailable("gdb is not installed")
    builds = {v: b for v in VERSIONS if (b := pyenv_build(v)) is not None}

    def one(version: tuple[int, int]) -> Dwarf:
        extra = debug_layout_expressions() if version >= (3, 13) else {}
        return run_gdb(builds[version].image, dwarf_expressions(version) | extra)

    with ThreadPoolExecutor(max_workers=len(builds) or 1) as pool:
        return dict(zip(builds, pool.map(one, builds), strict=True))


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
def test_table_matches_dwarf(version: tuple[int, int], dwarf: dict[tuple[int, int], Dwarf]) -> None:
    require_pyenv_build(version)
    found, exprs = dwarf[version].values, dwarf_expressions(version)
    assert found, "gdb found no DWARF"
    row = OFFSETS[version]
    assert row.version == version
    for field in fields(PythonOffsets)[1:]:
        expected = getattr(row, field.name)
        assert found.get(f"off:{field.name}", NONE) == expected, field.name
        if expected != NONE and exprs[field.name].startswith("&"):
            assert found[f"size:{field.name}"] == expected_width(field.name, version), field.name
    assert found["off:UNICODE_LENGTH"] == UNICODE_LENGTH


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
def test_unicode_state_bits_match_dwarf(
    version: tuple[int, int], dwarf: dict[tuple[int, int], Dwarf]
) -> None:
    require_pyenv_build(version)
    # gdb prints a bit field as "/* byte: bit | size */ unsigned int name : width;"
    layout = {
        name: (int(byte), int(bit), int(width))
        for byte, bit, name, width in re.findall(
            r"/\*\s+(\d+):\s*(\d+)\s+\|\s+\d+ \*/\s+unsigned int (\w+) : (\d+);",
            dwarf[version].ascii_object,
        )
    }
    state = OFFSETS[version].unicode_state
    assert layout["kind"] == (state, UNICODE_KIND_SHIFT, UNICODE_KIND_MASK.bit_length())
    assert layout["compact"] == (state, UNICODE_COMPACT_BIT, 1)
    assert layout["ascii"] == (state, UNICODE_ASCII_BIT, 1)


def test_debug_offsets_layout_matches_dwarf(dwarf: dict[tuple[int, int], Dwarf]) -> None:
    require_pyenv_build((3, 13))
    found = dwarf[(3, 13)].values
    assert found["off:debug.SIZE"] == DEBUG_OFFSETS_SIZE
    for name, position in DEBUG_OFFSET_POSITIONS.items():
        assert found[f"off:debug.{name}"] == position, name
        assert found[f"size:debug.{name}"] == 8, name


# --- parse_debug_offsets without a process: _PyRuntime's initial bytes in the file ---


def initial_debug_offsets() -> bytes:
    """_PyRuntime is statically initialized (.data): the file holds _Py_DebugOffsets."""
    build = require_pyenv_build((3, 13))
    return symbol_and_first_load(build.image, "_PyRuntime")[2][:DEBUG_OFFSETS_SIZE]


def test_parse_debug_offsets_of_the_313_build_equals_the_table() -> None:
    raw = initial_debug_offsets()
    assert len(raw) == DEBUG_OFFSETS_SIZE
    assert parse_debug_offsets(raw) == OFFSETS[(3, 13)]
    assert parse_debug_offsets(raw + b"more of _PyRuntime") == OFFSETS[(3, 13)]


def with_word(raw: bytes, name: str, value: int) -> bytes:
    position = DEBUG_OFFSET_POSITIONS[name]
    return raw[:position] + struct.pack("<Q", value) + raw[position + 8 :]


def test_parse_debug_offsets_rejects_what_is_not_313_debug_offsets() -> None:
    raw = initial_debug_offsets()
    assert parse_debug_offsets(raw[:-1]) is None  # too short
    assert parse_debug_offsets(b"ydebugpy" + raw[8:]) is None  # wrong cookie
    assert parse_debug_offsets(bytes(DEBUG_OFFSETS_SIZE)) is None
    assert parse_debug_offsets(with_word(raw, "version", 0x030E00F0)) is None  # 3.14 layout
    assert parse_debug_offsets(with_word(raw, "version", 0x020D00F0)) is None
    assert parse_debug_offsets(with_word(raw, "free_threaded", 7)) is None
    size = struct.unpack_from("<Q", raw, DEBUG_OFFSET_POSITIONS["thread_state.size"])[0]
    assert parse_debug_offsets(with_word(raw, "thread_state.native_thread_id", size)) is None
    assert parse_debug_offsets(with_word(raw, "code_object.size", 0)) is None
    assert parse_debug_offsets(with_word(raw, "interpreter_state.size", 1 << 40)) is None
    # A later 3.13 patch release with the same layout is still accepted.
    assert parse_debug_offsets(with_word(raw, "version", 0x030D05F0)) == OFFSETS[(3, 13)]
