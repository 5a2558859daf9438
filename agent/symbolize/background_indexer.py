"""BackgroundIndexer: the thread beside the sampling loop (`strobe-indexer`) that builds
the DWARF indexes symbolize() asked for."""

from __future__ import annotations

import logging
import threading

from agent.model import ProcessInfo
from agent.symbolize.symbolizer import Symbolizer

log = logging.getLogger(__name__)


class BackgroundIndexer:
    """Runs Symbolizer.prepare_pending() (and prepare(process) on request) off the hot path.

    The sampling side calls wake() after a window (or watch(process) for a new
    process); the thread indexes what is pending, then sleeps until woken or for
    `interval` seconds. A process whose binaries are all known already (under churn,
    the same few again and again) is not handed over, and the thread is not woken.
    """

    def __init__(self, symbolizer: Symbolizer, interval: float = 5.0) -> None:
        self._symbolizer = symbolizer
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._processes: list[ProcessInfo] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="strobe-indexer", daemon=True)
        symbolizer.set_waker(self.wake)  # a debuginfod download arrived: index it now

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def watch(self, process: ProcessInfo) -> None:
        """Index every binary of a process soon (e.g. right after it was captured), if
        there is anything to do (Symbolizer.needs_prepare)."""
        if not self._symbolizer.needs_prepare(process):
            return
        with self._lock:
            self._processes.append(process)
        self._wake.set()

    def queued(self) -> int:
        """Processes handed over and not prepared yet."""
        with self._lock:
            return len(self._processes)

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to stop and wait briefly: an index being built (a child, up to
        its timeout) finishes on its own; the thread is a daemon and never holds exit."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self._index_once()
            except Exception:  # never let one bad binary end indexing for good
                log.exception("background indexing failed")

    def _index_once(self) -> None:
        with self._lock:
            processes, self._processes = self._processes, []
        for process in processes:
            if self._stop.is_set():
                return
            self._symbolizer.prepare(process)
        # One binary at a time, so stop() is honoured between two slow indexes.
        while not self._stop.is_set() and self._symbolizer.pending():
            self._symbolizer.prepare_pending(limit=1)
