"""Pure conversions from raw BPF map contents to the pipeline's value types.

No bcc and no kernel here: the loader hands over plain `RawCount`s, stack address
lists and counter values, and these functions turn them into `StackSample`s and
loss deltas. Unit-tested without root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from agent.model import StackSample
from agent.python.frames import PY_MARKER, split_words

# Index order of the BPF `lost` array (enum lost_reason in bpf/profile.bpf.c).
LOST_REASONS = (
    "counts_map_full",  # a sample was dropped: the counts map had no room for a new key
    "user_stack_collision",  # sample kept without its user stack (stack map bucket taken)
    "user_stack_error",  # sample kept without its user stack (other walk error)
    "kernel_stack_collision",
    "kernel_stack_error",
    "pid_event_dropped",  # a new-pid event did not fit in the ring buffer (not a sample)
)
# The reasons that concern samples (Window.lost, strobe_samples_lost).
SAMPLE_LOSS_REASONS = LOST_REASONS[:5]

# Index order of the BPF `unwind_stats` array (enum unwind_stat in bpf/profile.bpf.c).
UNWIND_STATS = (
    "table_frames",  # frames stepped with an unwind table row
    "frame_pointer_frames",  # frames stepped with the frame pointer (no row)
    "stack_end",  # walks that reached an outermost frame
    "stopped",  # walks stopped early: unreadable memory, zero rbp or return address
    "truncated",  # walks cut at 127 frames or at the tail-call limit
    "no_user_registers",  # samples without user registers (kernel threads)
    "tail_call_failed",  # walker not loaded: the sample fell back to frame pointers
    "no_route",  # walks stopped at code not routed yet (a new process, or code mapped since)
    "no_table",  # walks stopped at code whose table was refused and that has no frame pointers
    "python_frames",  # Python frames read
    "python_no_thread",  # samples of a Python process whose thread runs no Python
    "python_unreadable",  # Python walks stopped at a frame that could not be read
    "python_truncated",  # Python walks cut at 64 frames
    "python_tail_call_failed",  # no tail call left for the Python walker: native frames only
)

# Index order of the BPF `off_cpu_stats` array (enum off_cpu_stat in bpf/profile.bpf.c).
OFF_CPU_STATS = (
    "switches",  # voluntary switch-outs (the thread blocks)
    "not_sampled",  # of those, skipped by --off-cpu-max-rate (the others weigh for them)
    "kernel_thread",  # of those sampled, kernel threads: not recorded
    "short",  # blocked intervals under --off-cpu-min-block: dropped
    "counted",  # blocked intervals counted
    "counts_full",  # blocked intervals lost: the off-CPU counts map had no room
)

EVENT_FIRST_SAMPLE = 0
EVENT_EXEC = 1
EVENT_UNKNOWN_MAPPING = 2  # the table walker met unmapped code: re-read the process's maps
EVENT_PYTHON_CODE = 3  # the Python walker met a code object new to the process (address)


@dataclass(frozen=True, slots=True)
class RawCount:
    """One entry of the BPF counts map, decoded to plain values."""

    slot: int
    pid: int
    user_stack_id: int  # < 0 means no user stack (-errno); a stack id or a stack hash
    kernel_stack_id: int
    comm: bytes  # NUL-padded, as the kernel wrote it
    count: int
    tid: int


@dataclass(frozen=True, slots=True)
class RawOffCpu:
    """One entry of the BPF off-CPU counts map: blocked intervals of one stack."""

    slot: int
    pid: int
    user_stack_id: int  # a stack hash; < 0: none
    kernel_stack_id: int
    comm: bytes
    count: int  # intervals
    nanoseconds: int  # their total length
    tid: int


Entry = TypeVar("Entry", RawCount, RawOffCpu)


@dataclass(frozen=True)
class PidEvent:
    """A process the sampler saw for the first time, or that called exec."""

    pid: int
    kind: int  # EVENT_FIRST_SAMPLE, EVENT_EXEC, EVENT_UNKNOWN_MAPPING or EVENT_PYTHON_CODE
    address: int = 0  # EVENT_PYTHON_CODE: the code object


def decode_comm(raw: bytes) -> str:
    """A task name from its NUL-padded kernel buffer."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def stack_addresses(ips: Iterable[int]) -> tuple[int, ...]:
    """The addresses of one stack-map entry, innermost first, up to the first 0."""
    addresses = []
    for ip in ips:
        if ip == 0:
            break
        addresses.append(ip)
    return tuple(addresses)


def entries_of_slot(entries: Iterable[Entry], slot: int) -> list[Entry]:
    return [entry for entry in entries if entry.slot == slot]


def to_stack_samples(
    entries: Iterable[RawCount],
    stacks: Mapping[int, tuple[int, ...]],
    user_stacks: Mapping[int, tuple[int, ...]] | None = None,
    python_stacks: Mapping[int, tuple[int, ...]] | None = None,
) -> tuple[StackSample, ...]:
    """Resolve stack ids and merge entries that end up with the same stack.

    Kernel stack ids resolve in `stacks`, user stack ids in `user_stacks` (the same
    map when user stacks come from frame pointers, the default). Negative ids (errors,
    or no stack of that kind) and ids missing from their map resolve to an empty
    stack. A user stack id may also have Python frames' words in `python_stacks`.
    Entries merge when their pid, comm and resolved stack ids are equal: those
    that differ only in an error code, or in an id missing from its map, merge.
    Result order: most samples first, then by pid, so output is deterministic.
    """
    user_stacks = stacks if user_stacks is None else user_stacks
    # Merged by stack id, not by the stack's addresses: an id names one stack (a hash of
    # it), and hashing ~50-address tuples took a third of this function's time.
    # Every id that resolves to no stack (an error, or missing from its map) is -1.
    merged: dict[tuple[int, bytes, int, int], list[int]] = {}
    for entry in entries:
        if entry.count <= 0:
            continue
        user_id, kernel_id = entry.user_stack_id, entry.kernel_stack_id
        key = (
            entry.pid,
            entry.comm,
            user_id if user_id >= 0 and user_id in user_stacks else -1,
            kernel_id if kernel_id >= 0 and kernel_id in stacks else -1,
        )
        total_and_tid = merged.get(key)
        if total_and_tid is None:
            merged[key] = [entry.count, entry.tid]
        else:
            total_and_tid[0] += entry.count
    comms: dict[bytes, str] = {}
    samples = []
    for (pid, raw_comm, user_id, kernel_id), (count, tid) in sorted(merged.items(), key=_order):
        comm = comms.get(raw_comm)
        if comm is None:
            comm = comms[raw_comm] = decode_comm(raw_comm)
        user = user_stacks[user_id] if user_id >= 0 else ()
        kernel = stacks[kernel_id] if kernel_id >= 0 else ()
        python = python_stacks.get(user_id, ()) if python_stacks and user_id >= 0 else ()
        samples.append(StackSample(pid, tid, comm, user, kernel, count, python))
    return tuple(samples)


def to_off_cpu_samples(
    entries: Iterable[RawOffCpu],
    user_stacks: Mapping[int, tuple[int, ...]],
    kernel_stacks: Mapping[int, tuple[int, ...]],
    python_stacks: Mapping[int, tuple[int, ...]] | None = None,
) -> tuple[tuple[StackSample, ...], int]:
    """Off-CPU entries as StackSamples (count: intervals, nanoseconds: blocked time, both
    already weighted in the kernel), and the number of intervals dropped because the LRU
    had evicted a stack they name."""
    samples, evicted = [], 0
    for entry in entries:
        user_id, kernel_id = entry.user_stack_id, entry.kernel_stack_id
        if (user_id >= 0 and user_id not in user_stacks) or (
            kernel_id >= 0 and kernel_id not in kernel_stacks
        ):
            evicted += entry.count
            continue
        samples.append(
            StackSample(
                pid=entry.pid,
                tid=entry.tid,
                comm=decode_comm(entry.comm),
                user_stack=user_stacks.get(user_id, ()) if user_id >= 0 else (),
                kernel_stack=kernel_stacks.get(kernel_id, ()) if kernel_id >= 0 else (),
                count=entry.count,
                python_stack=python_stacks.get(user_id, ()) if python_stacks else (),
                nanoseconds=entry.nanoseconds,
            )
        )
    samples.sort(key=lambda s: (-s.nanoseconds, s.pid, s.comm, s.user_stack, s.kernel_stack))
    return tuple(samples), evicted


def _order(item: tuple[tuple[int, bytes, int, int], list[int]]) -> tuple[int, int, bytes, int, int]:
    """Most samples first, then pid, comm and stack ids: the same entries, the same order."""
    (pid, comm, user_id, kernel_id), (count, _) = item
    return (-count, pid, comm, user_id, kernel_id)


def split_python_stacks(user_stacks: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    """Take the Python walker's words off the user stacks that have them (in place):
    stack id -> words; the stack keeps its native addresses."""
    python: dict[int, tuple[int, ...]] = {}
    for stack_id, words in user_stacks.items():
        if PY_MARKER in words:
            user_stacks[stack_id], python[stack_id] = split_words(words)
    return python


def lost_deltas(previous: Sequence[int], current: Sequence[int]) -> dict[str, int]:
    """Per-reason increase of the BPF loss counters between two reads.

    The kernel counters only grow; a decrease (counters recreated) counts as 0.
    """
    return {
        reason: max(0, now - (previous[i] if i < len(previous) else 0))
        for i, (reason, now) in enumerate(zip(LOST_REASONS, current, strict=False))
    }


@dataclass(frozen=True)
class NewProcess:
    """A pid to read from /proc now: first sampled, running a new image, or running
    code mapped since it was read."""

    pid: int
    # After an exec the pid and start time stay the same but every mapping changed,
    # so an earlier capture (say, of a vfork child before its exec) is stale; after an
    # unknown-code event the capture lacks what was mapped since (a dlopen). Read
    # again now: a process that exits before the window ends can't be read then.
    reread: bool
    # New code runs there now (an exec, or code the walker found unrouted): its unwind
    # tables go before the backlog of processes merely first sampled (at start-up, the
    # whole host).
    urgent: bool = field(default=False, compare=False)
    # A tick caught it on a CPU (its first sample, or the walker meeting unrouted code);
    # else only its exec was seen, and it may well exit before any tick.
    sampled: bool = field(default=False, compare=False)
    execed: bool = field(default=False, compare=False)  # it exec'd (a new image)


def new_processes(events: Iterable[PidEvent]) -> list[NewProcess]:
    """Distinct pids first sampled, exec'd or running new code, in the order they first
    appear. Reread after an exec, and after unknown code in a process that was not
    also first sampled now (a new process's first walk always meets unrouted code)."""
    events = [e for e in events if e.kind != EVENT_PYTHON_CODE]
    first = {e.pid for e in events if e.kind == EVENT_FIRST_SAMPLE}
    urgent = {e.pid for e in events if e.kind != EVENT_FIRST_SAMPLE}
    sampled = {e.pid for e in events if e.kind != EVENT_EXEC}
    execed = {e.pid for e in events if e.kind == EVENT_EXEC}
    changed = {
        e.pid
        for e in events
        if e.kind == EVENT_EXEC or (e.kind == EVENT_UNKNOWN_MAPPING and e.pid not in first)
    }
    return [
        NewProcess(pid, pid in changed, pid in urgent, pid in sampled, pid in execed)
        for pid in distinct_pids(events)
    ]


def distinct_pids(events: Iterable[PidEvent]) -> list[int]:
    """Distinct pids of `events`, in the order they first appear."""
    return list(dict.fromkeys(event.pid for event in events))


def fill_ratio(entries: int, capacity: int) -> float:
    return entries / capacity if capacity > 0 else 0.0
