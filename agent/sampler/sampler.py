"""The sampling stage: CPU stack samples from the kernel, one `Window` per drain.

    with Sampler(frequency=19) as sampler:
        sampler.start()
        while running:
            for pid in sampler.poll_new_pids(timeout_ms=100):
                ...  # read /proc/PID/maps now, before the process can exit
            window = sampler.drain()  # every N seconds

Draining loses nothing: the BPF program writes to the slot in its control map; a
drain flips the slot, waits out samples in flight, then reads and deletes only the
old slot's counts and stacks while new samples land in the other slot.
"""

from __future__ import annotations

import time
from types import TracebackType

from agent import metrics
from agent.model import Window
from agent.sampler.convert import (
    LOST_REASONS,
    SAMPLE_LOSS_REASONS,
    entries_of_slot,
    fill_ratio,
    lost_deltas,
    new_pids,
    to_stack_samples,
)
from agent.sampler.loader import (
    DEFAULT_COUNTS_ENTRIES,
    DEFAULT_STACK_ENTRIES,
    SamplerProgram,
    load_sampler_program,
)

# A BPF program that read the old slot just before the flip runs to its end within
# microseconds (it runs in timer interrupt context); this grace covers it with room.
FLIP_GRACE_SECONDS = 0.005


class Sampler:
    """Samples on-CPU stacks of every process (or one, with `pid`) at `frequency` Hz."""

    def __init__(
        self,
        frequency: int = 19,
        pid: int | None = None,
        *,
        counts_entries: int = DEFAULT_COUNTS_ENTRIES,
        stack_entries: int = DEFAULT_STACK_ENTRIES,
    ) -> None:
        if frequency <= 0:
            raise ValueError(f"sampling frequency must be positive, got {frequency}")
        if pid is not None and pid <= 0:
            raise ValueError(f"pid filter must be a positive pid, got {pid}")
        self.frequency = frequency
        self.pid = pid
        self._counts_entries = counts_entries
        self._stack_entries = stack_entries
        self._program: SamplerProgram | None = None
        self._slot = 0
        self._window_start_ns = 0
        self._lost_seen: tuple[int, ...] = ()
        self.pid_events_dropped = 0  # pid events the ring buffer had no room for

    def start(self) -> None:
        """Compile, load and attach the BPF program (about 2 s: LLVM compiles it)."""
        if self._program is not None:
            raise RuntimeError("sampler already started")
        program = load_sampler_program(
            self.frequency,
            self.pid,
            counts_entries=self._counts_entries,
            stack_entries=self._stack_entries,
        )
        try:
            program.set_slot(self._slot)
            self._lost_seen = program.read_lost()
            self._window_start_ns = time.time_ns()
            program.attach()
        except BaseException:
            program.close()
            raise
        self._program = program

    def poll_new_pids(self, timeout_ms: int = 0) -> list[int]:
        """Pids sampled for the first time or exec'd since the last call (deduplicated).

        Waits up to `timeout_ms` when there is nothing yet; 0 does not wait.
        """
        if self._program is None:
            return []
        return new_pids(self._program.poll_pid_events(timeout_ms))

    def drain(self) -> Window:
        """Everything sampled since the last drain (or start), as one Window."""
        program = self._require_started()
        old_slot = self._slot
        self._slot = 1 - old_slot
        program.set_slot(self._slot)
        end_ns = time.time_ns()
        time.sleep(FLIP_GRACE_SECONDS)

        entries = program.read_counts()
        drained = entries_of_slot(entries, old_slot)
        stacks = program.read_stacks(old_slot)
        samples = to_stack_samples(drained, stacks)
        program.delete_counts(drained)
        program.delete_stacks(old_slot, list(stacks))
        lost = self._take_lost(program)

        window = Window(start_ns=self._window_start_ns, end_ns=end_ns, samples=samples, lost=lost)
        self._window_start_ns = end_ns
        _record_metrics(window, program, len(entries), len(stacks))
        return window

    def _take_lost(self, program: SamplerProgram) -> dict[str, int]:
        """Sample losses since the previous drain; remembers pid-event drops aside."""
        current = program.read_lost()
        deltas = lost_deltas(self._lost_seen, current)
        self._lost_seen = current
        self.pid_events_dropped += deltas.get(LOST_REASONS[-1], 0)
        return {reason: deltas.get(reason, 0) for reason in SAMPLE_LOSS_REASONS}

    def _require_started(self) -> SamplerProgram:
        if self._program is None:
            raise RuntimeError("sampler is not started (call start() first) or is closed")
        return self._program

    def close(self) -> None:
        """Detach from the kernel and free the maps. Idempotent."""
        program, self._program = self._program, None
        if program is not None:
            program.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
