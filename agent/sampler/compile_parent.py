"""Parent side of the BPF compile: run a bcc compile in a short-lived child process
and keep only the fds it hands back.

bcc compiles with LLVM inside the calling process: ~100+ MB of RSS that would stay
for the agent's whole life. Here a child process (agent/sampler/compile_worker.py)
does the compile and load, passes the fds of every map and of the asked programs
back over a Unix socket (SCM_RIGHTS), and exits. The kernel objects live on through
the parent's fds; the parent never imports bcc and drives everything with
`agent.sampler.bpf_syscalls`, `bpf_map.BpfMap` and `ringbuf.RingBuffer`.

    compiled = compile_in_child(source, cflags, {"on_cpu_clock": "perf_event"},
                                env=headers.bcc_environment())
    counts = compiled.map("counts")          # a BpfMap
    prog_fd = compiled.programs["on_cpu_clock"]
    ...
    compiled.close()

Program arrays (tail calls) are filled either by the child before it hands the fds
over (`tail_calls={"jumps": {0: "step"}}`) or later by the parent
(`compiled.set_tail_call("jumps", 0, "step")`); either way the entries last while
the parent holds the array's fd.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from agent.sampler.bpf_map import BpfMap
from agent.sampler.bpf_syscalls import BPF_MAP_TYPE_PROG_ARRAY, map_info
from agent.sampler.compile_worker import PROGRAM_KINDS
from agent.sampler.ringbuf import RingBuffer

WORKER = Path(__file__).resolve().with_name("compile_worker.py")
MAX_MESSAGE = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD
OUTPUT_TAIL = 8000  # characters of compiler output kept in an error message


class BpfCompileError(RuntimeError):
    """The child could not compile or load the program. The message carries bcc's
    error and the tail of the compiler/verifier output; `output` has all of it."""

    def __init__(self, message: str, output: str = "", returncode: int | None = None):
        tail = output[-OUTPUT_TAIL:].strip()
        super().__init__(f"{message}\n--- compiler output ---\n{tail}" if tail else message)
        self.output = output
        self.returncode = returncode


class BpfCompileTimeout(BpfCompileError):
    """The child did not finish in time; it was killed (pid says which)."""

    def __init__(self, message: str, output: str, returncode: int | None, pid: int):
        super().__init__(message, output, returncode)
        self.pid = pid


@dataclass(frozen=True)
class MapFd:
    """A map's fd in this process and what the kernel says about the map."""

    name: str  # the name in the BPF source (the kernel keeps only 15 characters)
    fd: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int

    def bpf_map(self) -> BpfMap:
        return BpfMap(
            self.fd, self.key_size, self.value_size, self.max_entries, self.map_type, self.name
        )


class CompiledProgram:
    """Fds of a program's maps and loaded functions; `close()` releases them all."""

    def __init__(
        self,
        maps: dict[str, MapFd],
        programs: dict[str, int],
        functions: Sequence[str],
        recipe: dict[str, Any] | None = None,
    ) -> None:
        self.maps = maps
        self.programs = programs  # function name -> program fd
        self.functions = tuple(functions)  # every function in the source
        self.recipe = recipe  # how to load it again without a compiler (program_cache.py)
        self._closed = False

    def map(self, name: str) -> BpfMap:
        if name not in self.maps:
            raise KeyError(f"no map {name!r}; the program has {sorted(self.maps)}")
        return self.maps[name].bpf_map()

    def ring_buffer(self, name: str) -> RingBuffer:
        """A consumer for a BPF_RINGBUF_OUTPUT map (close it before `close()`)."""
        return RingBuffer(self.map(name).fd, name)

    def set_tail_call(self, prog_array: str, index: int, program: str) -> None:
        """prog_array[index] = program, from the parent (BPF_MAP_UPDATE_ELEM)."""
        array = self.map(prog_array)
        if array.map_type != BPF_MAP_TYPE_PROG_ARRAY:
            raise ValueError(f"map {prog_array!r} is not a program array")
        if program not in self.programs:
            raise KeyError(f"program {program!r} was not loaded; loaded: {sorted(self.programs)}")
        array.update(struct.pack("=I", index), struct.pack("=I", self.programs[program]))

    def close(self) -> None:
        """Close every fd: programs detach when their last attachment fd closes too. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fd in [m.fd for m in self.maps.values()] + list(self.programs.values()):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> CompiledProgram:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def compile_in_child(
    source: str,
    cflags: Sequence[str],
    programs: Mapping[str, str],
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    *,
    tail_calls: Mapping[str, Mapping[int, str]] | None = None,
) -> CompiledProgram:
    """Compile `source` with bcc in a child process; return the fds of every map and
    of `programs` (function name -> kind: "perf_event", "raw_tracepoint", ...; a
    tail-call target takes its caller's kind). `env` is added to the child's
    environment (e.g. BCC_KERNEL_SOURCE). `tail_calls` {prog_array: {index:
    function}} is filled by the child. Raises BpfCompileError (BpfCompileTimeout if
    the child outlived `timeout` seconds and was killed)."""
    request = _request(source, cflags, programs, tail_calls or {})
    deadline = time.monotonic() + timeout
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent_sock, tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as output:
        stdin.write(request)
        stdin.seek(0)
        with child_sock:
            proc = subprocess.Popen(
                [sys.executable, "-P", str(WORKER), str(child_sock.fileno()), str(os.getpid())],
                stdin=stdin,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(child_sock.fileno(),),
                env={**os.environ, **(env or {})},
            )
        received: list[tuple[str, str, int]] = []
        try:
            outcome = _receive(parent_sock, received, deadline)
        except TimeoutError:
            _kill(proc)
            _close_fds(received)
            raise BpfCompileTimeout(
                f"BPF compile child (pid {proc.pid}) did not finish within {timeout:g} s: killed",
                _read_output(output),
                proc.returncode,
                proc.pid,
            ) from None
        except BaseException:
            _kill(proc)
            _close_fds(received)
            raise
        returncode = _reap(proc, deadline)
        if outcome is None or outcome.get("type") != "done":
            _close_fds(received)
            raise BpfCompileError(_failure(outcome, returncode), _read_output(output), returncode)
    return _compiled(received, outcome)


def _request(
    source: str,
    cflags: Sequence[str],
    programs: Mapping[str, str],
    tail_calls: Mapping[str, Mapping[int, str]],
) -> bytes:
    for name, kind in programs.items():
        if kind not in PROGRAM_KINDS:
            raise ValueError(
                f"program {name!r}: unknown kind {kind!r}; known: {sorted(PROGRAM_KINDS)}"
            )
    for array, slots in tail_calls.items():
        for index, function in slots.items():
            if function not in programs:
                raise ValueError(
                    f"tail call {array}[{index}] -> {function!r}: add it to `programs` "
                    "with its caller's kind"
                )
    return json.dumps(
        {
            "source": source,
            "cflags": list(cflags),
            "programs": dict(programs),
            "tail_calls": {a: {str(i): f for i, f in s.items()} for a, s in tail_calls.items()},
        }
    ).encode()


def _receive(
    sock: socket.socket, received: list[tuple[str, str, int]], deadline: float
) -> dict[str, Any] | None:
    """Collect fd messages into `received` until the final message (None: the child
    closed the socket without one). Raises TimeoutError at the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or not data:
            _close_fds([("", "", fd) for fd in fds])
            if data:
                raise BpfCompileError("a message from the compile child was truncated")
            return None
        message = json.loads(data)
        if message.get("type") != "fds":
            return dict(message)
        items = message["items"]
        if len(items) != len(fds):
            _close_fds([("", "", fd) for fd in fds])
            raise BpfCompileError(f"compile child sent {len(fds)} fds for {len(items)} names")
        received.extend((kind, name, fd) for (kind, name), fd in zip(items, fds, strict=True))


def _compiled(received: list[tuple[str, str, int]], outcome: dict[str, Any]) -> CompiledProgram:
    maps: dict[str, MapFd] = {}
    programs: dict[str, int] = {}
    try:
        for kind, name, fd in received:
            if kind == "program":
                programs[name] = fd
                continue
            info = map_info(fd)  # the kernel's word on sizes and type
            maps[name] = MapFd(
                name, fd, info.map_type, info.key_size, info.value_size, info.max_entries
            )
    except BaseException:
        _close_fds(received)
        raise
    return CompiledProgram(maps, programs, outcome.get("functions", []), outcome.get("recipe"))


def _failure(outcome: dict[str, Any] | None, returncode: int | None) -> str:
    if outcome is not None and outcome.get("type") == "error":
        return f"BPF compile failed: {outcome.get('error')}"
    how = f"was killed by signal {-returncode}" if returncode and returncode < 0 else "exited"
    return f"BPF compile child {how} (status {returncode}) without a result"


def _read_output(output: IO[bytes]) -> str:
    output.flush()
    output.seek(0)
    return output.read().decode(errors="replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> int:
    """Wait for the child to exit; past the deadline it is killed (we have its result)."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return proc.returncode


def _close_fds(received: list[tuple[str, str, int]]) -> None:
    for _, _, fd in received:
        with contextlib.suppress(OSError):
            os.close(fd)
