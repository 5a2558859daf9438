"""Reading another process's memory: one process_vm_readv per read, no file descriptor.

Code objects, strings and line tables of a Python process are read while it runs; a
read that fails (the process exited, the address was freed) returns None, never raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

_U64 = struct.Struct("=Q")


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _load_readv() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = getattr(libc, "process_vm_readv", None)
    if function is not None:
        function.restype = ctypes.c_ssize_t
        function.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(_IoVec),
            ctypes.c_ulong,
            ctypes.POINTER(_IoVec),
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]
    return function


_READV = _load_readv()


def read_memory(pid: int, address: int, size: int) -> bytes | None:
    """`size` bytes at `address` in process `pid`, or None when they can't all be read."""
    if _READV is None or size <= 0 or address <= 0 or address + size > 1 << 47:
        return None
    buffer = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.cast(buffer, ctypes.c_void_p), size)
    remote = _IoVec(address, size)
    done = _READV(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return buffer.raw if done == size else None


def read_pointer(pid: int, address: int) -> int | None:
    data = read_memory(pid, address, 8)
    return _U64.unpack(data)[0] if data is not None else None
