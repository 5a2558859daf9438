"""A raised CPU priority for start-up only.

On a busy node every runnable process gets an equal share of the CPUs, so the ~0.4 s of
CPU from exec to the first sample (imports, loading the BPF program, attaching) took
5 s of wall time beside 20 busy loops on 2 CPUs (BENCHMARKS.md §13). When allowed
(CAP_SYS_NICE: root), start-up runs at nice -10, about ten times the weight of a nice-0
process, and once the sampler is attached every thread goes back to the nice it started
with: the steady-state work (symbolizing, shipping) never competes harder than the
deployment configured (systemd's Nice=, the container's CPU weight).

Linux keeps nice per thread and a new thread inherits its creator's, so the boost is set
on the main thread before anything else starts, and the end walks /proc/self/task.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

STARTUP_NICE_BOOST = -10


class StartupPriority:
    """Raise the calling thread's priority now; `end()` puts every thread back."""

    def __init__(self) -> None:
        self.original = os.getpriority(os.PRIO_PROCESS, 0)
        self.boosted = False
        target = max(-20, self.original + STARTUP_NICE_BOOST)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, target)
            self.boosted = True
        except OSError:  # no CAP_SYS_NICE: start at the configured priority
            pass

    def end(self) -> None:
        """Every thread of this process back to the original nice (idempotent)."""
        if not self.boosted:
            return
        self.boosted = False
        for tid in thread_ids():
            with contextlib.suppress(OSError):  # the thread has just exited
                os.setpriority(os.PRIO_PROCESS, tid, self.original)
        log.info("start-up ran at a raised priority; every thread back to nice %d", self.original)


_startup: StartupPriority | None = None


def begin() -> None:
    """Raise the priority for start-up (`strobe` and `python -m agent` only: a library
    caller, such as a test, keeps its own)."""
    global _startup
    _startup = StartupPriority()


def end() -> None:
    """Start-up is over (the sampler is attached): back to the original priority."""
    if _startup is not None:
        _startup.end()


def thread_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [os.getpid()]
