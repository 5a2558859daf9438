"""The real stages, composed: kernel sampler, process cache, symbolizer, labeler.

The one place that knows which concrete stage implements each step; `strobe run`,
`strobe record`, `strobe top` and the pull endpoint all build their pipeline here.
Slow symbol work (DWARF indexes) runs on an indexer thread beside the sampling loop:
a window ships with what is known, and frames get better in later windows.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.config import Config
from agent.model import ProcessInfo, StackSample
from agent.process.cache import ProcessCache
from agent.sampler.sampler import Sampler
from agent.session import Labels, SeriesLabels, Stages
from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.symbolizer import Symbolizer

log = logging.getLogger(__name__)


def node_only_labels(node: str) -> SeriesLabels:
    def series_labels(_process: ProcessInfo | None, _sample: StackSample) -> Labels:
        return (("node", node),)

    return series_labels


class Indexer:
    """Builds symbol indexes for newly seen processes on its own thread."""

    def __init__(self, symbolizer: Symbolizer, max_queue: int = 4096) -> None:
        self._symbolizer = symbolizer
        self._queue: queue.Queue[ProcessInfo | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def submit(self, process: ProcessInfo) -> None:
        try:
            self._queue.put_nowait(process)
        except queue.Full:  # symbolize() queues what it misses; prepare_pending() gets it
            log.debug("indexer queue full; pid %d waits for the pending pass", process.pid)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                process = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._prepare_pending()
                continue
            if process is None:
                return
            try:
                self._symbolizer.prepare(process)
            except Exception:  # a bad binary must not stop indexing the others
                log.exception("indexing pid %d failed", process.pid)

    def _prepare_pending(self) -> None:
        try:
            self._symbolizer.prepare_pending(limit=8)
        except Exception:
            log.exception("indexing pending binaries failed")

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass
class Pipeline:
    sampler: Sampler
    processes: ProcessCache
    symbolizer: Symbolizer
    stages: Stages
    period_ns: int
    indexer: Indexer | None = None
    on_new_process: list[Callable[[ProcessInfo], None]] = field(default_factory=list)

    def start(self) -> None:
        if self.indexer is not None:
            self.indexer.start()
        self.sampler.start()

    def capture_new_processes(self, timeout_ms: int) -> None:
        """Read /proc for processes the kernel just saw, before they can exit."""
        for pid in self.sampler.poll_new_pids(timeout_ms=timeout_ms):
            process = self.processes.capture(pid)
            if process is None:
                continue
            if self.indexer is not None:
                self.indexer.submit(process)
            for hook in self.on_new_process:
                hook(process)

    def prepare_now(self, pids: Iterable[int], budget_seconds: float) -> None:
        """Index the binaries of `pids` synchronously (one-shot record), within a budget."""
        deadline = time.monotonic() + budget_seconds
        for pid in sorted(set(pids)):
            process = self.processes.get(pid)
            if process is None:
                continue
            if time.monotonic() > deadline:
                log.warning("symbol indexing budget spent; some frames may stay unnamed")
                return
            try:
                self.symbolizer.prepare(process)
            except Exception:
                log.exception("indexing pid %d failed", pid)

    def end_window(self) -> None:
        self.processes.end_window()

    def close(self) -> None:
        self.sampler.close()
        if self.indexer is not None:
            self.indexer.close()


def build_pipeline(
    config: Config,
    pid: int | None = None,
    series_labels: SeriesLabels | None = None,
    background_indexing: bool = True,
) -> Pipeline:
    processes = ProcessCache()
    symbolizer = Symbolizer(kallsyms=Kallsyms.load())
    stages = Stages(
        resolve_process=processes.get,
        symbolize=symbolizer.symbolize,
        series_labels=series_labels or node_only_labels(config.resolved_node_name),
    )
    sampler = Sampler(frequency=config.frequency, pid=pid)
    indexer = Indexer(symbolizer) if background_indexing else None
    return Pipeline(
        sampler,
        processes,
        symbolizer,
        stages,
        period_ns=10**9 // config.frequency,
        indexer=indexer,
    )
