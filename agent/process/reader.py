"""Read one process from /proc: the only I/O edge of the process stage.

Never raises for what a host can do to us (a process exiting mid-read, a
permission error, a pid reused between two reads): it returns None and counts why.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from agent.metrics import PROCESS_READ_ERRORS
from agent.model import Mapping, ProcessInfo
from agent.process.maps import parse_maps, parse_stat

PROC = Path("/proc")


def read_text(path: Path) -> str:
    # surrogateescape keeps non-UTF-8 file names usable as paths later on; newline=""
    # keeps a "\r" in a file name instead of turning it into a line break.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def read_start(pid: int, proc: Path = PROC) -> tuple[str, int]:
    """(comm, start_time) of a live pid; raises OSError/ValueError when gone or odd."""
    return parse_stat(read_text(proc / str(pid) / "stat"))


def process_exists(pid: int, proc: Path = PROC) -> bool:
    """Whether `pid` names a live process (for refusing a --pid that cannot be profiled)."""
    return pid > 0 and (proc / str(pid)).is_dir()


def error_reason(exc: BaseException) -> str:
    """A bounded label for why reading /proc failed."""
    if isinstance(exc, (FileNotFoundError, ProcessLookupError)):
        return "vanished"
    if isinstance(exc, PermissionError):
        return "permission"
    if isinstance(exc, OSError) and exc.errno == errno.ESRCH:
        return "vanished"
    if isinstance(exc, ValueError):
        return "malformed"
    return "io"


def executable_mappings(text: str) -> tuple[Mapping, ...]:
    """Only executable mappings: the ones an instruction pointer can fall in."""
    return tuple(m for m in parse_maps(text) if "x" in m.perms)


def read_exe(pid: int, proc: Path) -> str:
    # Kernel threads have no exe; a permission error leaves it unknown but the rest useful.
    try:
        return os.readlink(proc / str(pid) / "exe")
    except OSError:
        return ""


def read_cmdline(pid: int, proc: Path) -> tuple[str, ...]:
    try:
        raw = read_text(proc / str(pid) / "cmdline")
    except OSError:
        return ()
    return tuple(arg for arg in raw.split("\0") if arg)


def read_process(pid: int, proc: Path = PROC) -> ProcessInfo | None:
    """Capture pid's comm, start time, exe, cmdline and executable mappings.

    Returns None (and counts strobe_process_read_errors{reason}) when the process
    vanished or could not be read. stat is read again at the end: if the start
    time changed, the pid was reused while we read, and the capture is discarded.
    Kernel threads come back with no mappings and exe "".
    """
    try:
        comm, start_time = read_start(pid, proc)
        exe = read_exe(pid, proc)
        cmdline = read_cmdline(pid, proc)
        mappings = executable_mappings(read_text(proc / str(pid) / "maps"))
        _, start_after = read_start(pid, proc)
    except (OSError, ValueError) as exc:
        PROCESS_READ_ERRORS.labels(reason=error_reason(exc)).inc()
        return None
    if start_after != start_time:
        PROCESS_READ_ERRORS.labels(reason="reused").inc()
        return None
    return ProcessInfo(
        pid=pid,
        start_time=start_time,
        comm=comm,
        exe=exe,
        mappings=mappings,
        cmdline=cmdline,
    )
