"""Python frames for the pipeline: which processes run CPython (told to the BPF
walker), their code objects, and the merge of Python frames into sampled stacks.

prepare runs on the sampling thread as each new, exec'd or changed process is read
(milliseconds: the ELF facts are cached per file), so a process's Python frames do not
wait behind the unwind workers' start-up backlog; sweep on an unwind worker thread;
note_code and merge on the sampling thread. The per-pid interpreter table is the
only state they share, under a lock.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent import metrics
from agent.model import Frame, Location, ProcessInfo
from agent.process.reader import PROC, read_start
from agent.python.code_objects import CodeObjects
from agent.python.frames import PythonWord, merge_runs, python_runs
from agent.python.interpreter import Interpreter, Unsupported, check_runtime, find_interpreter

log = logging.getLogger(__name__)

# struct py_proc of bpf/profile.bpf.c
PY_PROC = struct.Struct("=QQQ12HBBH4x")
PY_NONE = 0xFFFF
PY_FRAME_READ = 128  # the walker reads this many bytes of a frame at once
EXITED_WINDOWS = 2  # window ends an exited process's CPython is kept for its last samples
CPYTHON = "cpython"  # OTLP profile.frame.type of Python frames
GLIBC_PTHREAD_TID = 0x2D0  # struct pthread's tid (glibc 2.x, x86_64)


class PythonMaps(Protocol):
    def set_python_process(self, pid: int, config: bytes) -> None: ...

    def remove_python_process(self, pid: int) -> None: ...


def bpf_config(interpreter: Interpreter, pid_namespace: tuple[int, int] = (0, 0)) -> bytes | None:
    """The walker's struct py_proc, or None when a frame field lies past what it reads.
    pid_namespace: (nsfs device, inode) of the process's own pid namespace when it is not
    the agent's (a container), else (0, 0)."""
    o = interpreter.offsets
    frame_fields = (o.frame_previous, o.frame_code, o.frame_instr, o.frame_owner)
    if max(frame_fields) + 8 > PY_FRAME_READ:
        return None
    return PY_PROC.pack(
        interpreter.runtime + o.runtime_interpreters_head,
        *pid_namespace,
        o.interp_threads_head,
        o.tstate_next,
        _optional(o.tstate_native_thread_id),
        o.tstate_thread_id,
        o.tstate_frame,
        _optional(o.cframe_current_frame),
        o.frame_previous,
        o.frame_code,
        o.frame_instr,
        _optional(o.frame_owner),
        _optional(o.frame_is_entry),
        GLIBC_PTHREAD_TID,
        1 if interpreter.version >= (3, 11) else 0,
        o.owned_by_cstack if o.owned_by_cstack >= 0 else 0xFF,
        1 if interpreter.version < (3, 11) else 0,
    )


def pid_namespace(pid: int, proc: Path = PROC) -> tuple[int, int]:
    """(device, inode) of the process's pid namespace when it differs from the agent's:
    the ids Python stores for its threads are those of that namespace."""
    try:
        own = os.stat(proc / "self" / "ns" / "pid")
        theirs = os.stat(proc / str(pid) / "ns" / "pid")
    except OSError:
        return (0, 0)
    if (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino):
        return (0, 0)
    return (theirs.st_dev, theirs.st_ino)


def _optional(offset: int) -> int:
    return offset if offset >= 0 else PY_NONE


class PythonUnwinder:
    """Made by the pipeline; the sampler hands it the BPF maps when its program has
    the walker (`use_maps`). Until then, and without the walker, it does nothing."""

    def __init__(self, proc: Path = PROC) -> None:
        self._maps: PythonMaps | None = None
        self._proc = proc
        self._lock = threading.Lock()
        self._processes: dict[int, tuple[int, Interpreter]] = {}  # pid -> start time, CPython
        self._skipped_paths: set[str] = set()  # logged once each
        self.codes = CodeObjects()
        self._locations: dict[tuple[int, int, int], Location] = {}  # this window's
        self._logged_failure = False
        self._verified: set[int] = set()  # pids whose thread states matched the offsets
        self._exited: dict[int, tuple[Interpreter, int]] = {}  # pid -> CPython, windows left
        self._stale_codes: set[int] = set()  # pids whose code objects to drop (main thread)

    def use_maps(self, maps: PythonMaps | None) -> None:
        self._maps = maps

    # --- worker threads --------------------------------------------------------

    def prepare(self, process: ProcessInfo) -> None:
        """Tell the walker about the process's CPython (or that it has none now)."""
        maps = self._maps
        if maps is None:
            return
        found = find_interpreter(process, self._proc)
        config = None
        if isinstance(found, Unsupported):
            self._skip(found.path, "unsupported_version", f"CPython {found.version} unsupported")
        elif found is not None and not check_runtime(process.pid, found):
            self._skip(found.path, "offsets_mismatch", "its interpreter state does not match")
        elif found is not None:
            config = bpf_config(found, pid_namespace(process.pid, self._proc))
            if config is None:
                self._skip(found.path, "offsets_mismatch", "frame fields out of reach")
        with self._lock:
            known = self._processes.get(process.pid)
            if config is None or found is None or isinstance(found, Unsupported):
                if known is not None:
                    self._forget(process.pid)
                return
            if known == (process.start_time, found):
                return
            if self._exited.pop(process.pid, None) is not None or known is not None:
                self._stale_codes.add(process.pid)  # a reused pid: the old code is not its
            maps.set_python_process(process.pid, config)
            self._processes[process.pid] = (process.start_time, found)
            metrics.PYTHON_PROCESSES.set(len(self._processes))

    def prepare_safely(self, process: ProcessInfo) -> None:
        """prepare() for the sampling thread: a failure leaves native frames, logged."""
        try:
            self.prepare(process)
        except Exception:
            self._failed_once("Python frames for pid %d failed", process.pid)

    def sweep(self) -> None:
        """Forget processes that exited (or whose pid is another process now)."""
        with self._lock:
            pids = list(self._processes.items())
        for pid, (start_time, _) in pids:
            try:
                alive = read_start(pid, self._proc)[1] == start_time
            except (OSError, ValueError):
                alive = False
            if not alive:
                with self._lock:
                    if self._processes.get(pid, (None,))[0] == start_time:
                        self._forget(pid, exited=True)

    def _forget(self, pid: int, exited: bool = False) -> None:
        """Lock held. An exited process's interpreter and code objects stay until its
        last samples were merged (EXITED_WINDOWS window ends): it may have exited long
        before the window that holds them is drained."""
        _, interpreter = self._processes.pop(pid)
        self._verified.discard(pid)
        if self._maps is not None:
            self._maps.remove_python_process(pid)
        if exited:
            self._exited[pid] = (interpreter, EXITED_WINDOWS)
        else:
            self._stale_codes.add(pid)
        metrics.PYTHON_PROCESSES.set(len(self._processes))

    def _skip(self, path: str, reason: str, why: str) -> None:
        metrics.PYTHON_INTERPRETERS_SKIPPED.labels(reason).inc()
        if path not in self._skipped_paths:
            self._skipped_paths.add(path)
            log.warning("Python frames off for processes of %s: %s; native frames only", path, why)

    def interpreter(self, pid: int) -> Interpreter | None:
        with self._lock:
            known = self._processes.get(pid)
            exited = self._exited.get(pid)
        return known[1] if known else exited[0] if exited else None

    # --- sampling thread --------------------------------------------------------

    def note_code(self, pid: int, address: int) -> None:
        """A code object the walker met first: read it while the process lives."""
        interpreter = self.interpreter(pid)
        if interpreter is None:
            return
        self._drop_stale_codes()
        try:
            if pid not in self._verified and not self._verify(pid, interpreter):
                return
            self.codes.note(pid, address, interpreter)
        except Exception:  # what a process holds must never stop the sampling loop
            self._failed_once("reading a code object of pid %d failed", pid)

    def merge(
        self, pid: int, locations: tuple[Location, ...], words: Sequence[int]
    ) -> tuple[Location, ...]:
        """Kernel frames, then the native user frames with the Python frames in place."""
        interpreter = self.interpreter(pid)
        if interpreter is None or not words:
            return locations
        kernel = sum(1 for location in locations if location.kernel)
        try:
            runs = python_runs(words, lambda word: self._locate(pid, interpreter, word))
        except Exception:  # the stack keeps its native frames
            self._failed_once("Python frames of pid %d failed", pid)
            return locations
        return (*locations[:kernel], *merge_runs(locations[kernel:], runs))

    def _verify(self, pid: int, interpreter: Interpreter) -> bool:
        """Check the offsets once the interpreter runs code (at exec it had no threads
        to check them against): a contradiction turns the process's Python frames off."""
        if check_runtime(pid, interpreter):
            self._verified.add(pid)
            return True
        self._skip(interpreter.path, "offsets_mismatch", "its interpreter state does not match")
        with self._lock:
            if pid in self._processes:
                self._forget(pid)
        return False

    def _failed_once(self, message: str, pid: int) -> None:
        if not self._logged_failure:
            self._logged_failure = True
            log.exception(message, pid)

    def end_window(self) -> None:
        self._locations.clear()
        self._drop_stale_codes()
        with self._lock:
            for pid, (interpreter, windows) in list(self._exited.items()):
                if windows > 1:
                    self._exited[pid] = (interpreter, windows - 1)
                else:
                    del self._exited[pid]
                    self._stale_codes.add(pid)
        self._drop_stale_codes()
        reads, failures = self.codes.reads, self.codes.failures
        self.codes.reads = self.codes.failures = 0
        metrics.PYTHON_CODE_OBJECTS.labels("ok").inc(reads - failures)
        metrics.PYTHON_CODE_OBJECTS.labels("unreadable").inc(failures)

    def _drop_stale_codes(self) -> None:
        """On the sampling thread, which alone touches the code objects."""
        with self._lock:
            stale, self._stale_codes = self._stale_codes, set()
        for pid in stale:
            self.codes.forget(pid)

    def _locate(self, pid: int, interpreter: Interpreter, word: PythonWord) -> Location:
        key = (pid, word.code, word.position)
        location = self._locations.get(key)
        if location is None:
            location = self._locations[key] = python_location(self.codes, pid, interpreter, word)
        return location


def python_location(
    codes: CodeObjects, pid: int, interpreter: Interpreter, word: PythonWord
) -> Location:
    code = codes.get(pid, word.code, interpreter)
    if code is None:
        return Location(
            address=0,
            mapping=None,
            frames=(Frame(function="[unknown Python code]"),),
            frame_type=CPYTHON,
        )
    line = code.line(interpreter, word.position) or 0
    frame = Frame(
        function=code.name, file=code.filename, line=line, start_line=max(code.firstlineno, 0)
    )
    return Location(address=0, mapping=None, frames=(frame,), frame_type=CPYTHON)
