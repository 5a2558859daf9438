"""Python frames in a sampled stack: the walker's words decoded, and merged into the
native stack where the interpreter ran them.

The BPF walker appends, after the native frames, PY_MARKER and one word per Python
frame (leaf first; layout in bpf/profile.bpf.c). Each run of the C eval loop
(`_PyEval_EvalFrameDefault`) executes one or more Python frames, the outermost of
which carries the entry bit; each eval-loop native frame is replaced by its run, so
C extensions appear above their Python caller and callbacks from C nest correctly.
Pure functions: tested without a process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.model import Frame, Location

PY_MARKER = 0xFFFF_FFFF_FFFF_FFFF
PY_TRUNCATED = 0xFFFF_FFFF_FFFF_FFFE  # the walk stopped at its frame cap
ENTRY_BIT = 1 << 47
ADDRESS_MASK = ENTRY_BIT - 1
POSITION_SHIFT = 48
EVAL_LOOP = "_PyEval_EvalFrameDefault"
TRUNCATED_FRAME = Frame(function="[more Python frames]")


@dataclass(frozen=True, slots=True)
class PythonWord:
    code: int  # the code object's address
    entry: bool  # the outermost frame of one run of the eval loop
    position: int  # the instruction position, as the walker read it


def split_words(words: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(native addresses, Python words) of one user stack from the walker."""
    try:
        marker = words.index(PY_MARKER)
    except ValueError:
        return words, ()
    return words[:marker], words[marker + 1 :]


def decode_word(word: int) -> PythonWord:
    return PythonWord(word & ADDRESS_MASK, bool(word & ENTRY_BIT), word >> POSITION_SHIFT)


def python_runs(
    words: Sequence[int], locate: Callable[[PythonWord], Location]
) -> list[list[Location]]:
    """Python frames as Locations, grouped by run of the eval loop, leaf first."""
    runs: list[list[Location]] = [[]]
    for word in words:
        if word == PY_TRUNCATED:
            cut = Location(address=0, mapping=None, frames=(TRUNCATED_FRAME,), frame_type="cpython")
            runs[-1].append(cut)
            continue
        decoded = decode_word(word)
        runs[-1].append(locate(decoded))
        if decoded.entry:
            runs.append([])
    return [run for run in runs if run]


def is_eval_loop(location: Location) -> bool:
    return bool(location.frames) and location.frames[-1].function == EVAL_LOOP


def merge_runs(
    native: Sequence[Location], runs: Sequence[Sequence[Location]]
) -> tuple[Location, ...]:
    """The native user stack with each eval-loop frame replaced by its Python run.

    Runs left over when the native walk has fewer eval-loop frames (cut short) take
    the place of its last one; with none at all they go beneath the native frames.
    Eval-loop frames left over (a Python frame unread) stay native.
    """
    loops = [index for index, location in enumerate(native) if is_eval_loop(location)]
    if not loops:
        return (*native, *(location for run in runs for location in run))
    merged: list[Location] = []
    next_run = 0
    for index, location in enumerate(native):
        if not is_eval_loop(location) or next_run >= len(runs):
            merged.append(location)
        elif index == loops[-1]:  # the outermost loop: every run not placed yet
            for run in runs[next_run:]:
                merged.extend(run)
            next_run = len(runs)
        else:
            merged.extend(runs[next_run])
            next_run += 1
    return tuple(merged)
