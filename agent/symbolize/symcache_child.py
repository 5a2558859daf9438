"""The SymCache child: build one SymCache in a short-lived child process, under a memory
and a time cap. Both sides live here: `build_symcache` (parent) runs this module as
the child (`_child_main`).

DWARF of a hostile or simply enormous binary can take unbounded memory and time;
in a child, RLIMIT_AS bounds the one and a wall timeout (SIGKILL) the other, and
whatever happens there cannot take the agent down. The child writes the SymCache
to a file the parent then moves into the disk cache.

    parent: build_symcache(source, out, limits) -> BuildResult (or raises IndexFailure)
    child:  python -m agent.symbolize.symcache_child SOURCE OUT MAX_MEMORY_BYTES NICE
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_DWARF = 3  # symbolic could not read or index the file
EXIT_MEMORY = 4  # an allocation failed under RLIMIT_AS (MemoryError)
EXIT_USAGE = 5
STDERR_TAIL = 4096
# Rust aborts with the first; a failed mmap of the input surfaces as the second.
MEMORY_SIGNS = ("memory allocation of", "Cannot allocate memory")


@dataclass(frozen=True)
class IndexLimits:
    """Caps for one binary's indexing child."""

    max_memory_bytes: int = 1 << 30  # RLIMIT_AS of the child
    timeout_seconds: float = 60.0
    nice: int = 10  # the child yields the CPU to the sampling loop


@dataclass(frozen=True)
class BuildResult:
    seconds: float
    peak_rss_bytes: int  # the child's maximum resident set size


class IndexFailure(Exception):
    """The child did not produce a SymCache. `reason` labels strobe_binary_errors."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def child_command(source: Path, out: Path, limits: IndexLimits) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent.symbolize.symcache_child",
        str(source),
        str(out),
        str(limits.max_memory_bytes),
        str(limits.nice),
    ]


def child_environment() -> dict[str, str]:
    """The agent's environment, with the agent's own package importable in the child."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def build_symcache(source: Path, out: Path, limits: IndexLimits) -> BuildResult:
    """Index `source` into `out` in a capped child; raises IndexFailure when it fails."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            child_command(source, out, limits),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=child_environment(),
            close_fds=True,
        )
        timed_out, status, usage = wait_with_timeout(child.pid, limits.timeout_seconds)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - STDERR_TAIL))
        tail = stderr.read().decode("utf-8", "replace").strip()
    seconds = time.monotonic() - started
    if timed_out:
        raise IndexFailure("index_timeout", f"{source}: killed after {limits.timeout_seconds} s")
    code = child.returncode
    if code != 0 or not out.exists():
        raise IndexFailure(failure_reason(code, tail), f"{source}: exit {code}: {tail[-500:]}")
    return BuildResult(seconds, usage.ru_maxrss * 1024)


def failure_reason(code: int, stderr_tail: str) -> str:
    """strobe_binary_errors reason for a child's exit code (negative: killed by signal)."""
    if code == EXIT_MEMORY or any(sign in stderr_tail for sign in MEMORY_SIGNS):
        return "index_memory"  # Python's MemoryError, or Rust's abort on allocation failure
    if code == EXIT_DWARF:
        return "dwarf"
    return "index_crash"


def wait_with_timeout(pid: int, timeout: float) -> tuple[bool, int, resource.struct_rusage]:
    """Reap pid within timeout (SIGKILL after it); (timed out, wait status, rusage)."""
    timed_out = not _exits_within(pid, timeout)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    return timed_out, status, usage


def _exits_within(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # kernels before 5.3: poll instead
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.02)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _child_main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: symcache_child SOURCE OUT MAX_MEMORY_BYTES NICE", file=sys.stderr)
        return EXIT_USAGE
    source, out, max_memory, nice = argv[0], argv[1], int(argv[2]), int(argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError):
        os.nice(nice)
    try:
        from symbolic.debuginfo import Archive

        objects = list(Archive.open(source).iter_objects())
        if not objects:
            print(f"{source}: no object in file", file=sys.stderr)
            return EXIT_DWARF
        symcache = objects[0].make_symcache()
        with open(out, "wb") as f:
            symcache.dump_into(f)
    except MemoryError:
        return EXIT_MEMORY
    except Exception as exc:  # symbolic raises its own hierarchy for unreadable DWARF
        print(f"{source}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_DWARF
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
