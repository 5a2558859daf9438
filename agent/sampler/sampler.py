"""The sampling stage: CPU stack samples from the kernel, one `Window` per drain.

    with Sampler(frequency=19) as sampler:
        sampler.start()
        while running:
            for new in sampler.poll_new_processes(timeout_ms=100):
                ...  # read /proc/PID/maps now, before the process can exit
            window = sampler.drain()  # every N seconds

Draining loses nothing: the BPF program writes to the slot in its control map; a
drain flips the slot, waits out samples in flight, then reads and deletes only the
old slot's counts and stacks while new samples land in the other slot.

User stacks (`unwinder`):
    fp     frame pointers only (bpf_get_stackid), no tables.
    dwarf  tables from .eh_frame/.debug_frame walked in BPF, frame-pointer steps where
           no table covers an address; refuses to start if the kernel rejects the walker.
    auto   dwarf when the kernel accepts the walker, else fp (with a warning).
With tables, the pids that poll_new_processes sees (first sample, exec, and code the walker
found no table for) go to a worker thread that reads their mappings and builds and
loads their binaries' tables; until then their stacks use frame pointers.

Python frames (`python_frames`, with tables): the same workers tell the BPF walker
which processes run CPython (agent/python/); the walker's code-object events are read
here as they are polled, and each drained stack keeps its Python words apart
(StackSample.python_stack) for the merge after symbolization.

Off-CPU (`off_cpu`): a sched_switch program records where threads block and for how
long (bpf/profile.bpf.c, "Off-CPU time"); each drain also returns those intervals
(Window.off_cpu), their stacks read by hash from the kernel's LRU maps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client import Counter

from agent import metrics
from agent.model import ProcessInfo, StackSample, Window
from agent.python.unwinder import PythonUnwinder
from agent.sampler.convert import (
    EVENT_FIRST_SAMPLE,
    EVENT_PYTHON_CODE,
    LOST_REASONS,
    OFF_CPU_STATS,
    SAMPLE_LOSS_REASONS,
    UNWIND_STATS,
    NewProcess,
    entries_of_slot,
    fill_ratio,
    lost_deltas,
    new_processes,
    split_python_stacks,
    to_off_cpu_samples,
    to_stack_samples,
)
from agent.sampler.kernel_headers import find_kernel_headers
from agent.sampler.loader import (
    DEFAULT_COUNTS_ENTRIES,
    DEFAULT_STACK_ENTRIES,
    DEFAULT_UNWIND_ROWS,
    SamplerProgram,
    load_sampler_program,
)
from agent.unwind.registry import UnwindTables
from agent.unwind.worker import UnwindWorker
from agent.util.gcpause import cycle_collection_paused

log = logging.getLogger(__name__)

UNWINDERS = ("fp", "dwarf", "auto")

# A BPF program that read the old slot just before the flip runs to its end within
# microseconds (it runs in timer interrupt context); this grace covers it with room.
FLIP_GRACE_SECONDS = 0.005


@dataclass(frozen=True)
class OffCpuSettings:
    """What off-CPU time to record: intervals of at least min_block_us; at most max_rate
    blocking switches walked per second per CPU (0: all; the kernel weighs the rest)."""

    min_block_us: int = 1000
    max_rate: int = 1000


class Sampler:
    """Samples on-CPU stacks of every process (or one, with `pid`) at `frequency` Hz."""

    def __init__(
        self,
        frequency: int = 19,
        pid: int | None = None,
        *,
        unwinder: str = "auto",
        unwind_table_rows: int = DEFAULT_UNWIND_ROWS,
        counts_entries: int = DEFAULT_COUNTS_ENTRIES,
        stack_entries: int = DEFAULT_STACK_ENTRIES,
        cache_dir: str | Path | None = None,
        unwind_captures: bool = False,
        python: PythonUnwinder | None = None,
        off_cpu: OffCpuSettings | None = None,
    ) -> None:
        """unwind_captures: whoever polls hands each new process's capture to
        prepare_unwind (the pipeline does, from its process cache), and the unwind
        workers read nothing from /proc; else poll_new_processes queues the pids and the
        workers read them.
        python: walk CPython frames too and tell it about them (needs the table
        unwinder; with frame pointers only it stays idle).
        off_cpu: also record blocked time (Window.off_cpu)."""
        if frequency <= 0:
            raise ValueError(f"sampling frequency must be positive, got {frequency}")
        if pid is not None and pid <= 0:
            raise ValueError(f"pid filter must be a positive pid, got {pid}")
        if unwinder not in UNWINDERS:
            raise ValueError(f"unwinder must be one of {', '.join(UNWINDERS)}, got {unwinder!r}")
        if unwind_table_rows <= 0:
            raise ValueError(f"unwind_table_rows must be positive, got {unwind_table_rows}")
        self.frequency = frequency
        self.pid = pid
        self.unwinder = unwinder
        self._unwind_rows = unwind_table_rows
        self._counts_entries = counts_entries
        self._stack_entries = stack_entries
        self._cache_dir = Path(cache_dir) if cache_dir else None  # headers tree, programs
        self._unwind_captures = unwind_captures
        self._python = python
        self._off_cpu = off_cpu
        self._off_cpu_seen: tuple[int, ...] = ()
        self._program: SamplerProgram | None = None
        self._unwind_worker: UnwindWorker | None = None
        self._unwind_seen: tuple[int, ...] = ()
        self._unwind_exported: tuple[int, ...] = ()  # walker counters as of the last metrics
        self._slot = 0
        self._window_start_ns = 0
        self._lost_seen: tuple[int, ...] = ()
        self.pid_events_dropped = 0  # pid events the ring buffer had no room for

    def start(self) -> None:
        """Compile, load and attach the BPF program (about 2 s: LLVM compiles it)."""
        if self._program is not None:
            raise RuntimeError("sampler already started")
        program = self._load_program()
        try:
            program.set_slot(self._slot)
            if self._off_cpu is not None:
                program.set_off_cpu(self._off_cpu.min_block_us, self._off_cpu.max_rate)
                self._off_cpu_seen = program.read_off_cpu_stats()
            self._lost_seen = program.read_lost()
            self._unwind_seen = program.read_unwind_stats()
            if program.table_unwinding:
                if self._python is not None and program.python_frames:
                    self._python.use_maps(program)
                self._unwind_worker = UnwindWorker(UnwindTables(program), python=self._python)
                self._unwind_worker.start()
            self._window_start_ns = time.time_ns()
            program.attach()
        except BaseException:
            self._stop_unwind_worker()
            program.close()
            raise
        self._program = program

    def _load_program(self) -> SamplerProgram:
        headers = find_kernel_headers(cache_dir=self._cache_dir)

        def load(unwind_rows: int) -> SamplerProgram:
            return load_sampler_program(
                self.frequency,
                self.pid,
                counts_entries=self._counts_entries,
                stack_entries=self._stack_entries,
                unwind_rows=unwind_rows,
                headers=headers,
                cache_dir=self._cache_dir,
                python_frames=self._python is not None and unwind_rows > 0,
                off_cpu=self._off_cpu is not None,
            )

        if self.unwinder == "fp":
            return load(0)
        try:
            return load(self._unwind_rows)
        except Exception as exc:
            if self.unwinder == "dwarf":
                raise
            log.warning("table unwinder refused (%s); using frame pointers", exc)
            return load(0)

    @property
    def unwind_mode(self) -> str:
        """ "dwarf" when tables are in use, "fp" otherwise (decided at start)."""
        return "dwarf" if self._unwind_worker is not None else "fp"

    @property
    def unwind_tables(self) -> UnwindTables | None:
        """The table registry (None with frame pointers only)."""
        return self._unwind_worker.tables if self._unwind_worker else None

    def prepare_unwind(self, process: ProcessInfo, urgent: bool = True) -> None:
        """Queue a capture for its unwind tables, routed as captured (poll_new_processes
        queues the pids it reports unless unwind_captures); never blocks; no-op without
        tables. urgent: new code runs there (NewProcess.urgent)."""
        if self._unwind_worker is not None:
            self._unwind_worker.submit(process, urgent)

    def wait_unwind_ready(self, timeout: float) -> bool:
        """Wait until every queued process has its tables (one-shot use and tests)."""
        worker = self._unwind_worker
        return worker.wait_idle(timeout) if worker is not None else True

    def unwind_stats(self) -> dict[str, int]:
        """Walker counters since the previous call (zeros with frame pointers only)."""
        program = self._require_started()
        current = program.read_unwind_stats()
        previous = self._unwind_seen or (0,) * len(current)
        self._unwind_seen = current
        return {
            name: max(0, now - before)
            for name, now, before in zip(UNWIND_STATS, current, previous, strict=True)
        }

    def poll_new_processes(self, timeout_ms: int = 0) -> list[NewProcess]:
        """Pids sampled for the first time or exec'd since the last call (deduplicated).

        Waits up to `timeout_ms` when there is nothing yet; 0 does not wait.
        """
        if self._program is None:
            return []
        events = self._program.poll_pid_events(timeout_ms)
        worker, python = self._unwind_worker, self._python
        for event in events:
            if event.kind == EVENT_PYTHON_CODE:
                if python is not None:
                    python.note_code(event.pid, event.address)
            elif worker is not None and not self._unwind_captures:  # read from /proc there
                worker.submit_pid(event.pid, urgent=event.kind != EVENT_FIRST_SAMPLE)
        return new_processes(events)

    def drain(self) -> Window:
        """Everything sampled since the last drain (or start), as one Window."""
        program = self._require_started()
        old_slot = self._slot
        self._slot = 1 - old_slot
        program.set_slot(self._slot)
        end_ns = time.time_ns()
        time.sleep(FLIP_GRACE_SECONDS)

        with cycle_collection_paused():
            entries = program.read_counts()
            drained = entries_of_slot(entries, old_slot)
            stacks = program.read_stacks(old_slot)
            user_stacks = program.read_user_stacks(old_slot)
            python_stacks = split_python_stacks(user_stacks) if self._python else {}
            samples = to_stack_samples(drained, stacks, user_stacks, python_stacks)
        program.delete_counts(drained)
        program.delete_stacks(old_slot, list(stacks))
        if program.table_unwinding:
            program.delete_user_stacks(old_slot, list(user_stacks))
        lost = self._take_lost(program)
        off_cpu = self._drain_off_cpu(program, old_slot) if program.off_cpu else ()

        window = Window(self._window_start_ns, end_ns, samples, lost, off_cpu)
        self._window_start_ns = end_ns
        _record_metrics(window, program, len(entries), len(stacks))
        if program.table_unwinding:
            self._record_unwind_fill(program, len(user_stacks))
        return window

    def _drain_off_cpu(self, program: SamplerProgram, slot: int) -> tuple[StackSample, ...]:
        with cycle_collection_paused():
            entries = entries_of_slot(program.read_off_cpu_counts(), slot)
            user, kernel = program.read_off_cpu_stacks(
                {e.user_stack_id for e in entries if e.user_stack_id >= 0},
                {e.kernel_stack_id for e in entries if e.kernel_stack_id >= 0},
            )
            python = split_python_stacks(user) if self._python else {}
            samples, evicted = to_off_cpu_samples(entries, user, kernel, python)
        program.delete_off_cpu_counts(entries)
        current = program.read_off_cpu_stats()
        export_deltas(metrics.OFF_CPU_EVENTS, OFF_CPU_STATS, self._off_cpu_seen, current)
        self._off_cpu_seen = current
        if evicted:
            metrics.OFF_CPU_EVENTS.labels("stack_evicted").inc(evicted)
        return samples

    def _record_unwind_fill(self, program: SamplerProgram, user_stacks: int) -> None:
        fill = fill_ratio(user_stacks, program.user_stacks_capacity)
        metrics.MAP_FILL.labels("user_stacks").set(fill)
        tables = self.unwind_tables
        if tables is not None:
            stats = tables.stats()
            rows = fill_ratio(stats.rows_used, stats.rows_capacity)
            metrics.MAP_FILL.labels("unwind_rows").set(rows)
            metrics.UNWIND_TABLES_REFUSED.set(stats.refused_tables)
        current = program.read_unwind_stats()
        export_deltas(metrics.UNWIND_WALK_EVENTS, UNWIND_STATS, self._unwind_exported, current)
        self._unwind_exported = current

    def bpf_run_stats(self) -> dict[str, tuple[int, int]]:
        """Program -> (run_time_ns, run_cnt); counted only with kernel.bpf_stats_enabled=1."""
        return self._require_started().run_stats()

    def bpf_map_memory(self) -> dict[str, int]:
        """Map -> bytes charged by the kernel."""
        return self._require_started().map_memory()

    def _take_lost(self, program: SamplerProgram) -> dict[str, int]:
        """Sample losses since the previous drain; remembers pid-event drops aside."""
        current = program.read_lost()
        deltas = lost_deltas(self._lost_seen, current)
        self._lost_seen = current
        dropped = deltas.get(LOST_REASONS[-1], 0)
        self.pid_events_dropped += dropped
        if dropped:
            metrics.PID_EVENTS_DROPPED.inc(dropped)
        return {reason: deltas.get(reason, 0) for reason in SAMPLE_LOSS_REASONS}

    def _require_started(self) -> SamplerProgram:
        if self._program is None:
            raise RuntimeError("sampler is not started (call start() first) or is closed")
        return self._program

    def close(self) -> None:
        """Detach from the kernel and free the maps. Idempotent."""
        self._stop_unwind_worker()
        program, self._program = self._program, None
        if program is not None:
            program.close()

    def _stop_unwind_worker(self) -> None:
        if self._python is not None:
            self._python.use_maps(None)  # the maps close with the program
        worker, self._unwind_worker = self._unwind_worker, None
        if worker is not None:
            worker.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def export_deltas(
    counter: Counter, names: Sequence[str], previous: Sequence[int], current: Sequence[int]
) -> None:
    """Add each BPF counter's growth since `previous` (empty: since 0) to its labelled child."""
    previous = previous or (0,) * len(current)
    for name, now, before in zip(names, current, previous, strict=True):
        if now > before:
            counter.labels(name).inc(now - before)


def _record_metrics(
    window: Window, program: SamplerProgram, count_entries: int, stack_entries: int
) -> None:
    metrics.SAMPLES.inc(sum(sample.count for sample in window.samples))
    for reason, n in window.lost.items():
        if n:
            metrics.SAMPLES_LOST.labels(reason).inc(n)
    metrics.UNIQUE_STACKS.set(len(window.samples))
    metrics.MAP_FILL.labels("counts").set(fill_ratio(count_entries, program.counts_capacity))
    metrics.MAP_FILL.labels("stacks").set(fill_ratio(stack_entries, program.stacks_capacity))
