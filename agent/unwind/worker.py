"""The thread that builds unwind tables beside the sampling loop.

Building a table takes up to seconds for a large binary (pyelftools parses the CFI in
Python), so new processes are queued here and never block a drain. Between
processes, and at least every `sweep_seconds`, exited processes are forgotten so their
tables' rows are freed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

from agent.model import ProcessInfo
from agent.unwind.registry import UnwindTables

log = logging.getLogger(__name__)


class UnwindWorker:
    def __init__(
        self, tables: UnwindTables, sweep_seconds: float = 2.0, max_queue: int = 4096
    ) -> None:
        self.tables = tables
        self._sweep_seconds = sweep_seconds
        self._queue: queue.Queue[ProcessInfo | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="unwind-tables", daemon=True)
        self._stopped = threading.Event()
        self._pending = 0  # submitted and not yet prepared
        self._pending_changed = threading.Condition()
        self.dropped = 0  # processes not queued because the queue was full

    def start(self) -> None:
        self._thread.start()

    def submit(self, process: ProcessInfo) -> None:
        """Queue a process whose tables should be prepared; never blocks."""
        with self._pending_changed:
            try:
                self._queue.put_nowait(process)
            except queue.Full:
                self.dropped += 1
                return
            self._pending += 1

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted process was prepared (for tests and one-shot use)."""
        with self._pending_changed:
            return self._pending_changed.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        next_sweep = time.monotonic() + self._sweep_seconds
        while not self._stopped.is_set():
            try:
                process = self._queue.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                process = None
            if self._stopped.is_set():
                return
            if process is not None:
                self._prepare(process)
                with self._pending_changed:
                    self._pending -= 1
                    self._pending_changed.notify_all()
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + self._sweep_seconds

    def _prepare(self, process: ProcessInfo) -> None:
        try:
            self.tables.prepare(process)
        except Exception:  # one bad process must not stop the others
            log.exception("unwind tables for pid %d failed", process.pid)

    def _sweep(self) -> None:
        try:
            self.tables.sweep()
        except Exception:
            log.exception("unwind table sweep failed")

    def close(self) -> None:
        """Stop the thread (a table being built is finished first)."""
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
