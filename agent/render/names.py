"""What a frame and a process are called on screen (flame graph and `strobe top`).

A named frame shows its function. An unnamed one (no symbol) shows `0x<addr> (<mapping>)`
where each address matters (`strobe top`), or just `[<mapping>]` where only the time spent
in that file does (the flame graph folds a run of them into one such frame: an unwinder
walking a stripped library gives towers of addresses that split every stack and say
nothing more than "in libfoo").
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.model import Frame, Location, ProfileSample

Kind = Literal["root", "process", "user", "kernel", "unnamed", "elided"]
# (pid, comm) -> one process; comm only tells pid-less samples apart.
ProcessKey = tuple[int, str]


@dataclass(frozen=True, slots=True)
class StackFrame:
    name: str
    kind: Kind
    mapping: str = ""  # `[<mapping>]` of an unnamed frame, "" for a named one


def frame_name(location: Location, frame: Frame | None) -> str:
    """A frame's function, or `0x<addr> (<mapping basename>)` when it is unsymbolized."""
    if frame is not None and frame.function:
        return frame.function
    name = f"0x{location.address:x}"
    if location.mapping is not None and location.mapping.path:
        name += f" ({os.path.basename(location.mapping.path)})"
    elif location.kernel:
        name += " ([kernel])"
    return name


def mapping_label(location: Location) -> str:
    """`[libc.so.6]`, `[kernel]`, `[vdso]`, `[anon]`: where an unnamed frame ran."""
    if location.kernel:
        return "[kernel]"
    if location.mapping is None:
        return "[unknown]"
    path = location.mapping.path
    if not path:
        return "[anon]"  # JIT code and other anonymous executable memory
    if path.startswith("[") and path.endswith("]"):
        return path  # [vdso], [vsyscall] are bracketed already
    return f"[{os.path.basename(path)}]"


def location_frames(location: Location) -> tuple[StackFrame, ...]:
    """One location's frames, innermost (inlined) first, unnamed ones by address."""
    frames = []
    for frame in location.frames or (None,):
        name = frame_name(location, frame)
        if frame is not None and frame.function:
            frames.append(StackFrame(name, "kernel" if location.kernel else "user"))
        else:
            frames.append(StackFrame(name, "unnamed", mapping_label(location)))
    return tuple(frames)


# id(location) -> its frames, for one pass over samples that keep their locations alive
# (stacks share most locations; hashing a Location, with its Mapping, costs more).
FrameMemo = dict[int, tuple[StackFrame, ...]]


def stack_frames(sample: ProfileSample, memo: FrameMemo | None = None) -> list[StackFrame]:
    """Every frame of a sample's stack, innermost first, unnamed ones by address."""
    if memo is None:
        return [frame for location in sample.locations for frame in location_frames(location)]
    frames: list[StackFrame] = []
    for location in sample.locations:
        known = memo.get(id(location))
        if known is None:
            known = memo[id(location)] = location_frames(location)
        frames.extend(known)
    return frames


def folded_frames(sample: ProfileSample, memo: FrameMemo | None = None) -> list[StackFrame]:
    """`stack_frames` with each run of unnamed frames of one mapping as one `[mapping]`."""
    folded: list[StackFrame] = []
    for frame in stack_frames(sample, memo):
        if frame.kind != "unnamed":
            folded.append(frame)
        elif not folded or folded[-1].mapping != frame.mapping:
            folded.append(StackFrame(frame.mapping, "unnamed", frame.mapping))
    return folded


def sample_comm(sample: ProfileSample) -> str:
    return next((value for name, value in sample.labels if name == "comm"), "")


def process_key(sample: ProfileSample) -> ProcessKey:
    return (sample.pid, "") if sample.pid > 0 else (0, sample_comm(sample))


def process_comms(samples: Iterable[ProfileSample]) -> dict[ProcessKey, str]:
    """Each process's comm: the thread name most of its samples carry (threads may rename
    themselves; ties go to the first name in sort order, so output is stable)."""
    votes: dict[ProcessKey, Counter[str]] = defaultdict(Counter)
    for sample in samples:
        if sample.count > 0:
            votes[process_key(sample)][sample_comm(sample)] += sample.count
    return {
        key: min(counter, key=lambda comm: (-counter[comm], comm)) for key, counter in votes.items()
    }


def process_names(samples: Sequence[ProfileSample]) -> dict[ProcessKey, str]:
    """Flame graph process frames: `comm`, or `comm (pid N)` where processes share a comm."""
    comms = process_comms(samples)
    sharing = Counter(comms.values())
    names = {}
    for key, comm in comms.items():
        pid = key[0]
        if not comm:
            names[key] = f"pid {pid}" if pid else "[unknown]"
        elif sharing[comm] > 1 and pid:
            names[key] = f"{comm} (pid {pid})"
        else:
            names[key] = comm
    return names
