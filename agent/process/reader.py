"""Read one process from /proc: the only I/O edge of the process stage.

Never raises for what a host can do to us (a process exiting mid-read, a
permission error, a pid reused while we read): it returns None and counts why.

A process is read through one open /proc/PID directory: the kernel binds that
directory to the process it was opened for, so once the process has exited every file
opened through it fails (ESRCH), even after another process took the pid. One read of
each file then suffices (no second read of stat to catch a reuse).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from agent.metrics import PROCESS_READ_ERRORS
from agent.model import Mapping, ProcessInfo
from agent.process.maps import parse_executable_maps, parse_stat

PROC = Path("/proc")
CHUNK = 1 << 16


def _read_fd(fd: int) -> str:
    """All of an open file, as text; closes it. /proc files have no size: read to the
    end. surrogateescape keeps non-UTF-8 file names usable as paths later on, and no
    newline translation happens (a "\r" in a file name stays one)."""
    try:
        chunks = []
        while chunk := os.read(fd, CHUNK):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def read_text(path: Path | str, directory: int | None = None) -> str:
    """A file's text; `path` relative to the open `directory` when given."""
    return _read_fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory))


def read_start(pid: int, proc: Path = PROC) -> tuple[str, int]:
    """(comm, start_time) of a live pid; raises OSError/ValueError when gone or odd."""
    return parse_stat(read_text(f"{proc}/{pid}/stat"))


def running(pid: int, start_time: int, proc: Path = PROC) -> bool:
    """Whether the process that had this pid and start time still runs."""
    try:
        return read_start(pid, proc)[1] == start_time
    except (OSError, ValueError):
        return False


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
    return parse_executable_maps(text)


def read_exe(directory: int) -> str:
    # Kernel threads have no exe; a permission error leaves it unknown but the rest useful.
    try:
        return os.readlink("exe", dir_fd=directory)
    except OSError:
        return ""


def read_cmdline(directory: int) -> tuple[str, ...]:
    try:
        raw = read_text("cmdline", directory)
    except OSError:
        return ()
    return tuple(arg for arg in raw.split("\0") if arg)


def read_process(pid: int, proc: Path = PROC) -> ProcessInfo | None:
    """Capture pid's comm, start time, exe, cmdline and executable mappings.

    Returns None (and counts strobe_process_read_errors{reason}) when the process
    vanished or could not be read; everything is read through one open /proc/PID
    (module docstring), so a capture never mixes two processes that had the pid.
    Kernel threads come back with no mappings and exe "".
    """
    try:
        directory = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        PROCESS_READ_ERRORS.labels(reason=error_reason(exc)).inc()
        return None
    try:
        comm, start_time = parse_stat(read_text("stat", directory))
        exe = read_exe(directory)
        cmdline = read_cmdline(directory)
        mappings = executable_mappings(read_text("maps", directory))
    except (OSError, ValueError) as exc:
        PROCESS_READ_ERRORS.labels(reason=error_reason(exc)).inc()
        return None
    finally:
        os.close(directory)
    return ProcessInfo(
        pid=pid,
        start_time=start_time,
        comm=comm,
        exe=exe,
        mappings=mappings,
        cmdline=cmdline,
    )
