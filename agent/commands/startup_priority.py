"""A raised CPU priority for start-up only.

On a busy node every runnable process gets an equal share of the CPUs, so the ~0.4 s of
CPU from exec to the first sample (imports, loading the BPF program, attaching) took
5 s of wall time beside 20 busy loops on 2 CPUs (BENCHMARKS.md §13). When allowed
(CAP_SYS_NICE: root), start-up runs at nice -10, about ten times the weight of a nice-0
process, and once the sampler is attached every thread goes back to the nice it started
with: the steady state work (symbolizing, shipping) never competes harder than the
deployment configured (systemd's Nice=, the container's CPU weight).

Linux keeps nice per thread and a new thread inherits its creator's, so the boost is set
on the main thread before anything else starts, and the end walks /proc/self/task.

With autogroups on (kernel.sched_autogroup_enabled, the default of most distributions)
and no CPU cgroup of its own, the scheduler first shares the CPUs between sessions, and a
thread's nice only orders it within its session: beside 20 busy loops each in its own
session the thread nice alone gained nothing (BENCHMARKS.md §13a). So the session's
autogroup is raised to nice -10 too for start-up, and put back with the threads (only if
it still holds that value: another agent of the session may have put it back already). That
also raises whatever else runs in the agent's session (the shell of `strobe record`; a
service is a session of its own) for that second. An autogroup outlives the agent while
its session lives, so it is put back at exit too, and raised to an absolute nice (-10, or
left lower if set so) rather than by a step: an agent killed before it could put it back does
not make the next one raise it further.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

STARTUP_NICE_BOOST = -10
AUTOGROUP = Path("/proc/self/autogroup")  # "/autogroup-280 nice 0"


class StartupPriority:
    """Raise the calling thread's (and its session's) priority now; `end()` puts them back."""

    def __init__(self, autogroup: Path = AUTOGROUP) -> None:
        self.original = os.getpriority(os.PRIO_PROCESS, 0)
        self.autogroup = autogroup
        self.autogroup_original = read_autogroup_nice(autogroup)
        self.boosted = False
        self.autogroup_boosted = False
        self.autogroup_target = 0
        try:
            os.setpriority(os.PRIO_PROCESS, 0, boosted(self.original))
            self.boosted = True
        except OSError:  # no CAP_SYS_NICE: start at the configured priority
            return
        if self.autogroup_original is not None:
            self.autogroup_target = min(self.autogroup_original, STARTUP_NICE_BOOST)
            self.autogroup_boosted = write_autogroup_nice(autogroup, self.autogroup_target)

    def end(self, quiet: bool = False) -> None:
        """Every thread of this process, and the session, back to the original nice
        (idempotent); logged unless quiet."""
        if not self.boosted:
            return
        self.boosted = False
        for tid in thread_ids():
            with contextlib.suppress(OSError):  # the thread has just exited
                os.setpriority(os.PRIO_PROCESS, tid, self.original)
        if self.autogroup_boosted and self.autogroup_original is not None:
            self.autogroup_boosted = False
            # Only if still ours: another agent of the session that started meanwhile saw
            # our value as its original, and one that ended first has put it back already.
            if read_autogroup_nice(self.autogroup) == self.autogroup_target:
                write_autogroup_nice(self.autogroup, self.autogroup_original)
        if not quiet:
            log.info("start-up ran at a raised priority; threads back to nice %d", self.original)


def boosted(nice: int) -> int:
    return max(-20, nice + STARTUP_NICE_BOOST)


def read_autogroup_nice(path: Path) -> int | None:
    """The session's autogroup nice, or None (no autogroup support in this kernel)."""
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def write_autogroup_nice(path: Path, nice: int) -> bool:
    try:
        path.write_text(str(nice))
        return True
    except OSError:  # EPERM without CAP_SYS_NICE, EAGAIN rate-limited without CAP_SYS_ADMIN
        return False


_startup: StartupPriority | None = None


def begin() -> None:
    """Raise the priority for start-up (`strobe` and `python -m agent` only: a library
    caller, such as a test, keeps its own)."""
    global _startup
    if _startup is None:
        atexit.register(_end_at_exit)  # the session's autogroup outlives this process
    _startup = StartupPriority()


def again() -> None:
    """Raise it again after end(), if begin() raised it: for another burst of work someone
    waits on (`strobe record` symbolizing after sampling)."""
    if _startup is not None:
        begin()


def end() -> None:
    """Start-up is over (the sampler is attached): back to the original priority."""
    if _startup is not None:
        _startup.end()


def _end_at_exit() -> None:
    """Silently: an exit before start-up ended (a refused flag) says one line, no more."""
    if _startup is not None:
        _startup.end(quiet=True)


def thread_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [os.getpid()]
