"""Byte offsets of the CPython structures a profiler reads out of another process.

Why a table: the BPF unwinder and the /proc/PID/mem reader walk
_PyRuntime -> interpreter -> thread states -> frames -> code objects -> str/bytes of
a process that is not ours, and these are internal structures with no stable ABI.
They move between minor versions (3.11 replaced the PyFrameObject chain with
_PyInterpreterFrames reached through tstate->cframe, 3.12 dropped `wstr` from str
objects and added C-stack shim frames, 3.13 dropped _PyCFrame), but release builds of
one minor version share one layout. So: one row per minor version (x86_64, Linux, default
non-debug, GIL build), every value checked against the DWARF of real builds and by
walking live interpreters (tests/unit/test_python_offsets.py).

3.13 also publishes its own offsets at the start of _PyRuntime (_Py_DebugOffsets,
Include/internal/pycore_runtime.h); parse_debug_offsets reads them, so a build whose
layout differs from the table (another configure, a patched vendor build) can still
be walked.

Version-specific meanings a reader must respect:
  * frame_instr: 3.8/3.9 f_lasti is a byte offset into co_code, 3.10 f_lasti counts
    2-byte code units; 3.11/3.12 prev_instr points at the last executed code unit,
    3.13 instr_ptr at the current one, both inside co_code_adaptive.
  * code_linetable: 3.8/3.9 co_lnotab, 3.10 co_linetable (PEP 626 format), 3.11+
    co_linetable (location table format); three different encodings.
  * frame_code: 3.13's f_executable is a PyObject* (a code object for every frame a
    profiler walks, but check ob_type when in doubt).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

NONE = -1  # the field does not exist in this version

# PyASCIIObject.state is a 32-bit bit field word, the same in 3.8-3.13 (checked against
# DWARF per version): interned:2, kind:3, compact:1, ascii:1, then ready:1 (3.8-3.11)
# or statically_allocated:1 (3.12+). A compact ASCII string's chars start at
# unicode_ascii_data; a compact non-ASCII one's at unicode_compact_data, `kind` bytes
# per char (1: latin-1, 2: UCS-2, 4: UCS-4).
UNICODE_KIND_SHIFT = 2
UNICODE_KIND_MASK = 0b111
UNICODE_COMPACT_BIT = 5
UNICODE_ASCII_BIT = 6
UNICODE_LENGTH = 16  # PyASCIIObject.length (Py_ssize_t, in code points), after the header

# 3.8-3.10 thread states have no native_thread_id, only thread_id = pthread_self(),
# which on glibc is the address of the thread's `struct pthread`; its `tid` (the
# kernel tid, an int) sits at this offset on x86_64 (checked against glibc 2.36).
GLIBC_X86_64_PTHREAD_TID = 0x2D0


@dataclass(frozen=True, slots=True)
class PythonOffsets:
    """Byte offsets (or values) for one CPython minor version; NONE (-1) when absent."""

    version: tuple[int, int]
    runtime_interpreters_head: int  # _PyRuntimeState: interpreters.head
    interp_threads_head: int  # PyInterpreterState: tstate_head (3.8-3.10) / threads.head
    tstate_next: int
    tstate_interp: int
    tstate_thread_id: int  # unsigned long, pthread_self()
    tstate_native_thread_id: int  # kernel tid (3.11+)
    tstate_frame: int  # .frame (3.8-3.10), .cframe (3.11, 3.12), .current_frame (3.13)
    cframe_current_frame: int  # _PyCFrame.current_frame (3.11, 3.12)
    frame_previous: int  # f_back (3.8-3.10) / previous
    frame_code: int  # f_code (3.8-3.12) / f_executable (3.13)
    frame_instr: int  # f_lasti (int) / prev_instr (3.11, 3.12) / instr_ptr (3.13)
    frame_owner: int  # char (3.11+)
    frame_is_entry: int  # bool (3.11 only)
    code_filename: int
    code_name: int
    code_qualname: int  # 3.11+
    code_firstlineno: int  # int
    code_linetable: int  # co_lnotab (3.8, 3.9) / co_linetable: a bytes object
    code_code_adaptive: int  # 3.11+: bytecode inline in the code object
    unicode_state: int  # PyASCIIObject.state
    unicode_ascii_data: int  # sizeof(PyASCIIObject)
    unicode_compact_data: int  # sizeof(PyCompactUnicodeObject)
    bytes_size: int  # ob_size
    bytes_data: int  # ob_sval
    owned_by_cstack: int  # value of FRAME_OWNED_BY_CSTACK (3.12+)


# 3.8-3.10 share everything but f_lasti's offset (3.10 moved f_lasti before f_lineno).
_PY38 = PythonOffsets(
    version=(3, 8),
    runtime_interpreters_head=32,
    interp_threads_head=8,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=176,
    tstate_native_thread_id=NONE,
    tstate_frame=24,
    cframe_current_frame=NONE,
    frame_previous=24,
    frame_code=32,
    frame_instr=104,
    frame_owner=NONE,
    frame_is_entry=NONE,
    code_filename=104,
    code_name=112,
    code_qualname=NONE,
    code_firstlineno=40,
    code_linetable=120,
    code_code_adaptive=NONE,
    unicode_state=32,
    unicode_ascii_data=48,
    unicode_compact_data=72,
    bytes_size=16,
    bytes_data=32,
    owned_by_cstack=NONE,
)

_PY311 = PythonOffsets(
    version=(3, 11),
    runtime_interpreters_head=40,
    interp_threads_head=16,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=152,
    tstate_native_thread_id=160,
    tstate_frame=56,
    cframe_current_frame=8,
    frame_previous=48,
    frame_code=32,
    frame_instr=56,
    frame_owner=69,
    frame_is_entry=68,
    code_filename=112,
    code_name=120,
    code_qualname=128,
    code_firstlineno=72,
    code_linetable=136,
    code_code_adaptive=184,
    unicode_state=32,
    unicode_ascii_data=48,
    unicode_compact_data=72,
    bytes_size=16,
    bytes_data=32,
    owned_by_cstack=NONE,
)

_PY312 = PythonOffsets(
    version=(3, 12),
    runtime_interpreters_head=40,
    interp_threads_head=72,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=136,
    tstate_native_thread_id=144,
    tstate_frame=56,
    cframe_current_frame=0,
    frame_previous=8,
    frame_code=0,
    frame_instr=56,
    frame_owner=70,
    frame_is_entry=NONE,
    code_filename=112,
    code_name=120,
    code_qualname=128,
    code_firstlineno=68,
    code_linetable=136,
    code_code_adaptive=192,
    unicode_state=32,
    unicode_ascii_data=40,
    unicode_compact_data=56,
    bytes_size=16,
    bytes_data=32,
    owned_by_cstack=3,
)

# 3.13: _PyRuntime starts with _Py_DebugOffsets (584 bytes), hence interpreters.head at
# 632; the thread list sits deep in PyInterpreterState; no more _PyCFrame.
_PY313 = PythonOffsets(
    version=(3, 13),
    runtime_interpreters_head=632,
    interp_threads_head=7344,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=152,
    tstate_native_thread_id=160,
    tstate_frame=72,
    cframe_current_frame=NONE,
    frame_previous=8,
    frame_code=0,
    frame_instr=56,
    frame_owner=70,
    frame_is_entry=NONE,
    code_filename=112,
    code_name=120,
    code_qualname=128,
    code_firstlineno=68,
    code_linetable=136,
    code_code_adaptive=200,
    unicode_state=32,
    unicode_ascii_data=40,
    unicode_compact_data=56,
    bytes_size=16,
    bytes_data=32,
    owned_by_cstack=3,
)

OFFSETS: dict[tuple[int, int], PythonOffsets] = {
    (3, 8): _PY38,
    (3, 9): replace(_PY38, version=(3, 9)),
    (3, 10): replace(_PY38, version=(3, 10), frame_instr=96),
    (3, 11): _PY311,
    (3, 12): _PY312,
    (3, 13): _PY313,
}

# _Py_DebugOffsets of 3.13 (Include/internal/pycore_runtime.h), in declaration order:
# every member is 8 bytes (cookie is char[8], the rest uint64_t), and every sub-struct
# starts with its C struct's sizeof. The layout is only stable within a minor version
# (3.14 changes it), so only 3.13's is parsed.
_DEBUG_LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("cookie", "version", "free_threaded")),
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    (
        "interpreter_state",
        (
            "size", "id", "next", "threads_head", "gc", "imports_modules", "sysdict",
            "builtins", "ceval_gil", "gil_runtime_state", "gil_runtime_state_enabled",
            "gil_runtime_state_locked", "gil_runtime_state_holder",
        ),
    ),
    (
        "thread_state",
        (
            "size", "prev", "next", "interp", "current_frame", "thread_id",
            "native_thread_id", "datastack_chunk", "status",
        ),
    ),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner")),
    (
        "code_object",
        (
            "size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
            "localsplusnames", "localspluskinds", "co_code_adaptive",
        ),
    ),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags")),
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
    ("unicode_object", ("size", "state", "length", "asciiobject_size")),
    ("gc", ("size", "collecting")),
)  # fmt: skip


def _debug_offset_positions() -> dict[str, int]:
    """'section.member' -> byte offset inside _Py_DebugOffsets (top level: 'member')."""
    names = [f"{section}.{m}" if section else m for section, ms in _DEBUG_LAYOUT for m in ms]
    return {name: 8 * index for index, name in enumerate(names)}


DEBUG_OFFSET_POSITIONS = _debug_offset_positions()
DEBUG_OFFSETS_SIZE = 8 * len(DEBUG_OFFSET_POSITIONS)  # sizeof(_Py_DebugOffsets): 584
DEBUG_COOKIE = b"xdebugpy"
_MAX_STRUCT = 1 << 24  # sizes are at most a few hundred KiB (PyInterpreterState ~190 KiB)
_COMPACT_EXTRA = 16  # PyCompactUnicodeObject = PyASCIIObject + utf8_length + utf8 (3.12+)
_FRAME_OWNED_BY_CSTACK_313 = 3  # enum _frameowner in 3.13's pycore_frame.h

# Offsets parse_debug_offsets uses, by the section whose `size` bounds them.
_USED: dict[str, tuple[str, ...]] = {
    "runtime_state": ("interpreters_head",),
    "interpreter_state": ("threads_head",),
    "thread_state": ("next", "interp", "current_frame", "thread_id", "native_thread_id"),
    "interpreter_frame": ("previous", "executable", "instr_ptr", "owner"),
    "code_object": ("filename", "name", "qualname", "linetable", "firstlineno", "co_code_adaptive"),
    "bytes_object": ("ob_size", "ob_sval"),
    "unicode_object": ("state", "asciiobject_size"),
}


def _plausible(values: dict[str, int]) -> bool:
    # Garbage that happens to start with the cookie must not steer reads: each used
    # offset lies inside its struct, and structs have sane sizes.
    for section, members in _USED.items():
        size = values[f"{section}.size"]
        if not 0 < size < _MAX_STRUCT:
            return False
        if any(values[f"{section}.{member}"] >= size for member in members):
            return False
    return values["free_threaded"] in (0, 1)


def parse_debug_offsets(raw: bytes) -> PythonOffsets | None:
    """The offsets from a 3.13+ process's _Py_DebugOffsets (the start of _PyRuntime, cookie
    b"xdebugpy"), or None when `raw` is not one (wrong cookie, too short, implausible values).

    Only 3.13's layout is known (it changes between minor versions): other versions give
    None. Two values are not published and come from 3.13's headers instead:
    unicode_compact_data (asciiobject_size + 16) and owned_by_cstack (3). A free-threaded
    build (free_threaded == 1) is accepted: its offsets are the process's own.
    """
    if len(raw) < DEBUG_OFFSETS_SIZE or raw[:8] != DEBUG_COOKIE:
        return None
    words = struct.unpack_from(f"<{DEBUG_OFFSETS_SIZE // 8}Q", raw)
    values = {name: words[pos // 8] for name, pos in DEBUG_OFFSET_POSITIONS.items()}
    version = values["version"]  # PY_VERSION_HEX: 0x030D00F0 for 3.13.0
    if (version >> 24, (version >> 16) & 0xFF) != (3, 13) or not _plausible(values):
        return None
    return _from_debug_values(values)


def _from_debug_values(v: dict[str, int]) -> PythonOffsets:
    ascii_size = v["unicode_object.asciiobject_size"]
    return PythonOffsets(
        version=(3, 13),
        runtime_interpreters_head=v["runtime_state.interpreters_head"],
        interp_threads_head=v["interpreter_state.threads_head"],
        tstate_next=v["thread_state.next"],
        tstate_interp=v["thread_state.interp"],
        tstate_thread_id=v["thread_state.thread_id"],
        tstate_native_thread_id=v["thread_state.native_thread_id"],
        tstate_frame=v["thread_state.current_frame"],
        cframe_current_frame=NONE,
        frame_previous=v["interpreter_frame.previous"],
        frame_code=v["interpreter_frame.executable"],
        frame_instr=v["interpreter_frame.instr_ptr"],
        frame_owner=v["interpreter_frame.owner"],
        frame_is_entry=NONE,
        code_filename=v["code_object.filename"],
        code_name=v["code_object.name"],
        code_qualname=v["code_object.qualname"],
        code_firstlineno=v["code_object.firstlineno"],
        code_linetable=v["code_object.linetable"],
        code_code_adaptive=v["code_object.co_code_adaptive"],
        unicode_state=v["unicode_object.state"],
        unicode_ascii_data=ascii_size,
        unicode_compact_data=ascii_size + _COMPACT_EXTRA,
        bytes_size=v["bytes_object.ob_size"],
        bytes_data=v["bytes_object.ob_sval"],
        owned_by_cstack=_FRAME_OWNED_BY_CSTACK_313,
    )
