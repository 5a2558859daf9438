"""The threads that build unwind tables beside the sampling loop.

Building a table takes up to seconds for a large binary, so pids are queued here and
never block a drain. A pid comes with its capture (the pipeline's process cache read
/proc at the event: it is not read again here), or alone, and then the worker reads its
mappings when it gets to it. A newer capture of a queued pid replaces the older one, so
an exec or a dlopen since the pid was queued is seen. Two workers share the
queue: while one parses a big table (libclang-cpp: 900k rows, 4 s quiet, 15 s beside
busy processes), the other keeps routing new processes of known binaries, which
takes milliseconds. Between pids, and at least every `sweep_seconds`, exited
processes are forgotten so their tables' rows are freed (and, with Python frames on,
the Python walker's exited processes).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.model import ProcessInfo
from agent.process.reader import PROC, read_process
from agent.unwind.registry import UnwindTables

if TYPE_CHECKING:
    from agent.python.unwinder import PythonUnwinder

log = logging.getLogger(__name__)

STOP, URGENT, BACKLOG = 0, 1, 2  # queue priorities, lowest first


class UnwindWorker:
    def __init__(
        self,
        tables: UnwindTables,
        sweep_seconds: float = 2.0,
        max_queue: int = 4096,
        read: Callable[[int], ProcessInfo | None] | None = None,
        proc: Path = PROC,
        threads: int = 2,
        python: PythonUnwinder | None = None,
    ) -> None:
        self.tables = tables
        self._python = python
        self._sweep_seconds = sweep_seconds
        self._read = read or (lambda pid: read_process(pid, proc))
        # (priority, order, pid): new code (exec, unknown code) before the backlog of
        # processes first seen at start-up; None stops a thread.
        self._queue: queue.PriorityQueue[tuple[int, int, int | None]] = queue.PriorityQueue(
            max_queue
        )
        self._order = itertools.count()
        self._threads = [
            threading.Thread(target=self._run, name=f"unwind-tables-{n}", daemon=True)
            for n in range(threads)
        ]
        self._stopped = threading.Event()
        self._queued: dict[int, int] = {}  # pid -> its best queued priority: once per turn
        self._captures: dict[int, ProcessInfo] = {}  # queued pid -> its latest capture
        self._preparing = 0  # pids taken off the queue and not prepared yet
        self._changed = threading.Condition()
        self.dropped = 0  # pids not queued because the queue was full

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, process: ProcessInfo, urgent: bool = True) -> None:
        """Queue a capture whose tables should be (re)prepared, as captured (no /proc
        read here); never blocks. Urgent as for submit_pid."""
        self._submit(process.pid, urgent, process)

    def submit_pid(self, pid: int, urgent: bool = True) -> None:
        """Queue a pid whose tables should be (re)prepared, read from /proc when its
        turn comes; never blocks. Urgent: new code runs there now (an exec, code not
        routed yet); else a process first seen (at start-up: the whole host), prepared
        after the urgent ones."""
        self._submit(pid, urgent, None)

    def _submit(self, pid: int, urgent: bool, capture: ProcessInfo | None) -> None:
        priority = URGENT if urgent else BACKLOG
        with self._changed:
            if self._queued.get(pid, priority + 1) > priority:
                try:
                    self._queue.put_nowait((priority, next(self._order), pid))
                except queue.Full:
                    self.dropped += 1
                    return
                self._queued[pid] = priority
            if capture is not None:
                self._captures[pid] = capture  # the newest wins
            else:
                self._captures.pop(pid, None)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued pid was prepared (for tests and one-shot use)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queued and not self._preparing, timeout)

    def _run(self) -> None:
        next_sweep = time.monotonic() + self._sweep_seconds
        while not self._stopped.is_set():
            try:
                priority, _, pid = self._queue.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                pid = None
            if self._stopped.is_set():
                return
            turn = self._take(pid, priority) if pid is not None else None
            if turn is not None:
                try:
                    self._prepare(*turn)
                finally:
                    with self._changed:
                        self._preparing -= 1
                        self._changed.notify_all()
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + self._sweep_seconds

    def _take(self, pid: int, priority: int) -> tuple[int, ProcessInfo | None] | None:
        """(pid, its capture if one came) when this queue entry is the pid's current one
        (a more urgent entry made a later one stale), else None; the pid leaves the
        queued set before it is prepared, so a new event during the prepare queues it
        again."""
        with self._changed:
            if self._queued.get(pid) != priority:
                return None
            del self._queued[pid]
            self._preparing += 1
            return pid, self._captures.pop(pid, None)

    def _prepare(self, pid: int, capture: ProcessInfo | None) -> None:
        try:
            process = capture if capture is not None else self._read(pid)
            if process is not None:  # else it exited: nothing left to unwind
                self.tables.prepare(process)
        except Exception:  # one bad process must not stop the others
            log.exception("unwind tables for pid %d failed", pid)

    def _sweep(self) -> None:
        try:
            self.tables.sweep()
            if self._python is not None:
                self._python.sweep()
        except Exception:
            log.exception("unwind table sweep failed")

    def close(self, timeout: float = 1.0) -> None:
        """Stop the threads. The tables are closed first, so a table still being parsed
        (seconds, for a big binary) is dropped when done rather than written into maps
        that are about to close; the threads are daemons and never hold exit."""
        self._stopped.set()
        self.tables.close()
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait((STOP, next(self._order), None))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
