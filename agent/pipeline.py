"""The real stages, composed: kernel sampler, process cache, symbolizer, labeler.

The one place that knows which concrete stage implements each step; `strobe run`,
`strobe record`, `strobe top` and the pull endpoint all build their pipeline here.
Slow work runs beside the sampling loop: DWARF indexes on the indexer thread, pod
metadata on the Kubernetes watch thread. A window ships with what is known.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.config import Config, ConfigError
from agent.labels.guard import CardinalityGuard
from agent.labels.kubeconfig import discover_connection
from agent.labels.kubernetes import KubernetesPodWatcher
from agent.labels.labeler import Labeler
from agent.model import ProcessInfo, StackSample
from agent.process.cache import ProcessCache
from agent.python.unwinder import PythonUnwinder
from agent.sampler.convert import NewProcess
from agent.sampler.sampler import OffCpuSettings, Sampler
from agent.symbolize.background_indexer import BackgroundIndexer
from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.symbolizer import Symbolizer
from agent.window_flow import Labels, SeriesLabels, Stages

log = logging.getLogger(__name__)

# An exec'd process is prepared for the walkers once it has run this long (or at its
# first sample): see Pipeline.capture_new_processes.
PREPARE_AFTER_SECONDS = 0.02
# While pid events keep coming (churn), they are handled in batches at most this often
# instead of one wake-up of the loop each (a wake-up cost more than the rest of an exec).
BATCH_SECONDS = 0.005


def labeled_series(labeler: Labeler, guard: CardinalityGuard) -> SeriesLabels:
    """Series labels of a sample: relabeled discovery labels, under the cardinality cap."""

    def series_labels(process: ProcessInfo | None, sample: StackSample) -> Labels | None:
        if process is None:  # exited before we could read it: what the sample itself says
            process = ProcessInfo(sample.pid, -1, sample.comm, "", ())
        labels = labeler.series_labels(process)
        return None if labels is None else guard.admit(labels, sample.count)

    return series_labels


@dataclass
class Pipeline:
    sampler: Sampler
    processes: ProcessCache
    symbolizer: Symbolizer
    stages: Stages
    period_ns: int
    guard: CardinalityGuard
    labeler: Labeler
    indexer: BackgroundIndexer | None = None
    pod_watcher: KubernetesPodWatcher | None = None
    python: PythonUnwinder | None = None
    prepare_after: float = PREPARE_AFTER_SECONDS
    batch_seconds: float = BATCH_SECONDS
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _busy_at: float = field(default=-math.inf, init=False, repr=False)  # last batch's end
    # pid -> (when to prepare it, its capture): exec'd processes not sampled yet, due first
    _unprepared: OrderedDict[int, tuple[float, ProcessInfo]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )

    def start(self) -> None:
        if self.indexer is not None:
            self.indexer.start()
        # Reading and packing /proc/kallsyms takes 0.1-0.4 s: do it while the sampler's
        # compile child works (this thread mostly waits on the child's socket meanwhile).
        with ThreadPoolExecutor(1, thread_name_prefix="kallsyms") as pool:
            kallsyms = pool.submit(Kallsyms.load)
            self.sampler.start()
            self.symbolizer.use_kallsyms(kallsyms.result())

    def capture_new_processes(self, timeout_ms: int) -> None:
        """Read /proc for processes the kernel just saw, before they can exit. Changed
        ones (an exec: often short-lived) go before those merely sampled first (at start
        the whole host), which stay readable. Each capture is read once, here, and
        handed on: the unwind workers route it as it is. A process already gone costs
        nothing more (its last capture, if any, stays in the cache).

        A process seen only exec'ing is captured at once (if a tick catches it before
        it exits, its samples are named from this capture) but prepared for the walkers
        (unwind routes, Python) only once it has run `prepare_after` seconds, or at its
        first sample: under churn most exec'd processes (/bin/true, a probe) exit
        before either, and then cost no routes to add and remove. A first sample within
        that time keeps only its leaf frame (the walker meets code not routed yet, and
        its unknown-code event has the process prepared at once).

        Within `batch_seconds` of a batch (events, or processes due) it first waits out
        the rest of that time, at most timeout_ms: under churn the loop then wakes at
        most 1/batch_seconds times a second, for all that came meanwhile."""
        rest = min(self._busy_at + self.batch_seconds - self.clock(), timeout_ms / 1000)
        if rest > 0:
            self.sleep(rest)
            timeout_ms = max(0, timeout_ms - math.ceil(rest * 1000))
        news = self.sampler.poll_new_processes(timeout_ms=self._poll_timeout(timeout_ms))
        for new in sorted(news, key=lambda new: not new.reread):
            process = self._capture(new)
            if process is None:
                continue
            if new.sampled:
                self._prepare(process, urgent=new.urgent)
            else:
                self._unprepared[new.pid] = (self.clock() + self.prepare_after, process)
        if self._prepare_due() or news:
            self._busy_at = self.clock()

    def _capture(self, new: NewProcess) -> ProcessInfo | None:
        """The live process's capture: read now, or the one of an exec'd process still
        waiting to be prepared (moments old) when it is sampled now."""
        waiting = self._unprepared.pop(new.pid, None)
        if waiting is not None and not new.reread:  # a re-read: mapped since (libpython)
            return waiting[1]
        process = self.processes.capture_live(new.pid, reread=new.reread)
        if process is not None and self.indexer is not None:
            self.indexer.watch(process)
        return process

    def _poll_timeout(self, timeout_ms: int) -> int:
        """timeout_ms, or less: until the first unprepared process is due."""
        if not self._unprepared:
            return timeout_ms
        due, _ = next(iter(self._unprepared.values()))
        return max(0, min(timeout_ms, math.ceil((due - self.clock()) * 1000)))

    def _prepare_due(self) -> bool:
        """Prepare the exec'd processes that have run prepare_after and still do, read
        again (the capture at exec predates the libraries the loader maps, libpython
        among them); whether any was due."""
        now, due_any = self.clock(), False
        while self._unprepared:
            pid, (due, _) = next(iter(self._unprepared.items()))
            if due > now:
                break
            del self._unprepared[pid]
            due_any = True
            process = self.processes.capture_live(pid, reread=True)
            if process is not None:
                if self.indexer is not None:
                    self.indexer.watch(process)
                self._prepare(process, urgent=True)
        return due_any

    def _prepare(self, process: ProcessInfo, urgent: bool) -> None:
        """Unwind routes and tables (on the workers), and the Python walker (here, not
        behind the table workers' backlog)."""
        self.sampler.prepare_unwind(process, urgent=urgent)
        if self.python is not None:
            self.python.prepare_safely(process)

    def prepare_now(self, pids: Iterable[int], budget_seconds: float) -> None:
        """Index the binaries of `pids` synchronously (one-shot record), within a budget.

        Waits, within the same budget, for the debuginfod downloads this starts: record
        has no later window in which a download could still be used.
        """
        deadline = time.monotonic() + budget_seconds
        arrived = threading.Event()
        self.symbolizer.set_waker(arrived.set)
        try:
            for pid in sorted(set(pids)):
                process = self.processes.get(pid)
                if process is None:
                    continue
                if time.monotonic() > deadline:
                    log.warning("symbol indexing budget spent; some frames may stay unnamed")
                    return
                self.symbolizer.prepare(process)
            self._index_downloads(arrived, deadline)
        finally:
            self.symbolizer.set_waker(None)

    def _index_downloads(self, arrived: threading.Event, deadline: float) -> None:
        """Index each download as it arrives, until none is awaited or the deadline."""
        while True:
            arrived.clear()
            self.symbolizer.prepare_pending()
            if not self.symbolizer.awaiting_downloads():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("debuginfod downloads still running; some frames may stay unnamed")
                return
            arrived.wait(min(remaining, 1.0))

    def end_window(self) -> None:
        self.processes.end_window()
        self.labeler.end_window()
        self.symbolizer.end_window()
        if self.python is not None:
            self.python.end_window()
        self.guard.start_window()
        if self.indexer is not None:
            self.indexer.wake()

    def close(self) -> None:
        self.sampler.close()
        if self.indexer is not None:
            self.indexer.stop()
        self.symbolizer.close()
        if self.pod_watcher is not None:
            self.pod_watcher.close()


def start_pod_watcher(config: Config) -> KubernetesPodWatcher | None:
    try:
        connection = discover_connection(config.kubeconfig or None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"kubeconfig: {exc}") from None
    if connection is None:
        return None
    log.info("pod labels: watching pods on node %s", config.resolved_node_name)
    return KubernetesPodWatcher(connection, config.resolved_node_name).start()


def off_cpu_settings(config: Config) -> OffCpuSettings | None:
    if not config.off_cpu:
        return None
    min_block_us = max(1, round(config.off_cpu_min_block * 1_000_000))
    return OffCpuSettings(min_block_us, config.off_cpu_max_rate)


def build_pipeline(
    config: Config, pid: int | None = None, background_indexing: bool = True
) -> Pipeline:
    processes = ProcessCache()
    symbolizer = Symbolizer.from_config(config)  # kallsyms: loaded by Pipeline.start()
    pod_watcher = start_pod_watcher(config)
    labeler = Labeler(config.resolved_node_name, config.relabel_configs, kubernetes=pod_watcher)
    guard = CardinalityGuard(config.max_series_per_window)
    python = None if config.no_python_frames else PythonUnwinder()
    stages = Stages(
        resolve_process=processes.get_covering,
        symbolize=symbolizer.symbolize,
        series_labels=labeled_series(labeler, guard),
        merge_python=python.merge if python is not None else None,
    )
    return Pipeline(
        sampler=Sampler(
            frequency=config.frequency,
            pid=pid,
            unwinder=config.unwinder,
            unwind_table_rows=config.unwind_table_rows,
            cache_dir=config.cache_dir,
            unwind_captures=True,
            python=python,
            off_cpu=off_cpu_settings(config),
        ),
        processes=processes,
        symbolizer=symbolizer,
        stages=stages,
        period_ns=10**9 // config.frequency,
        guard=guard,
        labeler=labeler,
        indexer=BackgroundIndexer(symbolizer) if background_indexing else None,
        pod_watcher=pod_watcher,
        python=python,
    )
