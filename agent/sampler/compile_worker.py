"""Child side of the BPF compile (the parent is `agent.sampler.compile_parent`): compile
and load a bcc program, hand the fds of its maps and programs to the parent over
SCM_RIGHTS, and exit.

Run as a script, never imported by the agent at run time apart from its constants:

    python -P compile_worker.py SOCKET_FD PARENT_PID  < request.json

It imports nothing from the agent (only the standard library and bcc), so a compile
neither depends on nor pays for the rest of the package. Request (JSON on stdin):
    {"source": str, "cflags": [str], "programs": {function: kind},
     "tail_calls": {prog_array_map: {index: function}}}
Messages to the parent (SOCK_SEQPACKET, one JSON object each):
    {"type": "fds", "items": [[kind, name], ...]}   with the matching fds attached
    {"type": "done", "functions": [every function name in the source],
     "recipe": {"license": str, "kern_version": int,
                "programs": {function: {"kind": str, "insns": hex, "maps": {insn index: map}}}}}
    {"type": "error", "error": str, "traceback": str}
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

# Program kind -> enum bpf_prog_type. A tail-call target has its caller's kind.
PROGRAM_KINDS = {
    "socket_filter": 1,
    "kprobe": 2,
    "tracepoint": 5,
    "perf_event": 7,
    "raw_tracepoint": 17,
    "tracing": 26,
}
INSN_SIZE = 8  # struct bpf_insn
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
PSEUDO_MAP_FD = 1  # its src_reg when imm is a map fd
MAX_FDS_PER_MESSAGE = 200  # the kernel takes at most 253 (SCM_MAX_FD) per message
PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    _die_with_parent(int(argv[2]))
    try:
        request = json.loads(sys.stdin.buffer.read())
        bpf, handles, functions = load(request)
    except BaseException as exc:  # everything goes back to the parent, with its message
        _send(
            sock,
            {
                "type": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            },
        )
        return 1
    for start in range(0, len(handles), MAX_FDS_PER_MESSAGE):
        batch = handles[start : start + MAX_FDS_PER_MESSAGE]
        items = [[kind, name] for kind, name, _ in batch]
        _send(sock, {"type": "fds", "items": items}, [fd for _, _, fd in batch])
    _send(sock, {"type": "done", "functions": functions, "recipe": recipe(bpf, request, lib_())})
    del bpf  # kept alive until the parent holds every fd
    return 0


def load(request: dict[str, Any]) -> tuple[Any, list[tuple[str, str, int]], list[str]]:
    """Compile, create the maps, load the asked programs, fill program arrays."""
    from bcc import BPF  # the heavy import (LLVM) happens only in this process
    from bcc.libbcc import lib

    bpf = BPF(text=request["source"].encode(), cflags=list(request["cflags"]))
    programs: dict[str, int] = {}
    for name, kind in request["programs"].items():
        programs[name] = bpf.load_func(name.encode(), PROGRAM_KINDS[kind]).fd
    for map_name, slots in request.get("tail_calls", {}).items():
        table = bpf.get_table(map_name.encode())
        for index, function in slots.items():
            table[ctypes.c_int(int(index))] = ctypes.c_int(programs[function])
    handles = [("map", name, fd) for name, fd in _table_fds(bpf.module, lib)]
    handles += [("program", name, fd) for name, fd in programs.items()]
    count = lib.bpf_num_functions(bpf.module)
    functions = [lib.bpf_function_name(bpf.module, i).decode() for i in range(count)]
    return bpf, handles, functions


def lib_() -> Any:
    from bcc.libbcc import lib

    return lib


def recipe(bpf: Any, request: dict[str, Any], lib: Any) -> dict[str, Any]:
    """What loading the programs again takes without LLVM: their instructions as bcc
    loaded them, with each map reference (an ld_imm64 of BPF_PSEUDO_MAP_FD whose imm is
    this process's fd) named, so another process can put its own maps' fds there."""
    names = {fd: name for name, fd in _table_fds(bpf.module, lib)}
    programs = {}
    for name, kind in request["programs"].items():
        insns = bpf.dump_func(name.encode())
        programs[name] = {"kind": kind, "insns": insns.hex(), "maps": _map_refs(insns, names)}
    return {
        "license": lib.bpf_module_license(bpf.module).decode(),
        "kern_version": int(lib.bpf_module_kern_version(bpf.module)),
        "programs": programs,
    }


def _map_refs(insns: bytes, names: dict[int, str]) -> dict[str, str]:
    """{instruction index: map name} of the ld_imm64 instructions that load a map fd."""
    refs = {}
    for index in range(len(insns) // INSN_SIZE):
        code, regs = insns[index * INSN_SIZE], insns[index * INSN_SIZE + 1]
        if code == LD_IMM64 and regs >> 4 == PSEUDO_MAP_FD:
            fd = int.from_bytes(insns[index * INSN_SIZE + 4 : index * INSN_SIZE + 8], "little")
            if fd not in names:
                raise RuntimeError(f"instruction {index} loads fd {fd}, which is no map")
            refs[str(index)] = names[fd]
    return refs


def _table_fds(module: int, lib: Any) -> list[tuple[str, int]]:
    """(name, fd) of every map bcc created for the module (extern tables have none)."""
    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    tables = []
    for i in range(lib.bpf_num_tables(module)):
        fd = lib.bpf_table_fd_id(module, i)
        if fd >= 0:
            tables.append((lib.bpf_table_name(module, i).decode(), fd))
    return tables


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds or [])


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL if the parent dies first: an orphan compile serves nobody."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


if __name__ == "__main__":
    status = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # skip LLVM's and bcc's teardown: the kernel objects live on in the parent
