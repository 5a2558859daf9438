"""What makes symbolize() cheap per frame: memoized Locations and frame counts in ints.

A window holds ~1 M frames but far fewer distinct (process, address) pairs: stacks of
one process share most of their frames. So each process's mappings get an AddressSpace
(a MappingIndex plus the Locations already made there), and a frame seen before costs
one dict lookup. Reusing the Location object also lets build_pprof find it by identity.

A memoized Location is reused until what it was made from changes: the binary got a
DWARF index or was evicted (the symbolizer then calls forget_binary), the file had
failed to open and its retry time came or a download of it ended (the space is dropped
then: without the memo, 1,000 processes of an unreadable binary cost ten times more per
window), or the budget of memoized Locations ran out (all are dropped). JIT frames
(perf maps grow) are never memoized.

A space no stack used for IDLE_WINDOWS windows is dropped at the end of a window: under
process churn, memory follows the processes that ran lately, not every process seen.
An idle process that runs again gets a new space; its binaries' indexes stay cached.
"""

from __future__ import annotations

import functools
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from prometheus_client import Counter

from agent.metrics import FRAMES
from agent.model import Location, Mapping
from agent.process.mapindex import MappingIndex
from agent.util.lru import idle_keys

MAX_SPACES = 4096  # processes (the process cache holds as many by default)
MAX_LOCATIONS = 1 << 17  # memoized Locations in all spaces (~240 bytes each: <= ~30 MiB)
IDLE_WINDOWS = 2

# Frame outcomes, counted in a plain list and added to strobe_symbolize_frames once per
# window (FrameCounts.publish): a labels().inc() per frame cost ~20% of a window, and an
# inc() per stack still ~5%.
OUTCOMES = (
    ("kernel", "hit"),
    ("kernel", "miss"),
    ("user", "hit"),
    ("user", "miss"),
    ("jit", "hit"),
    ("jit", "miss"),
)
KERNEL_HIT, KERNEL_MISS, USER_HIT, USER_MISS, JIT_HIT, JIT_MISS = range(len(OUTCOMES))
Tally = list[int]  # a count per OUTCOMES entry


class FrameCounts:
    """Frame outcomes not yet added to strobe_symbolize_frames."""

    __slots__ = ("tally",)

    def __init__(self) -> None:
        self.tally: Tally = [0] * len(OUTCOMES)

    def publish(self) -> None:
        """Add the counts to the metric. Subtracted in place, not swapped for a new list:
        an increment made meanwhile by another thread stays for the next publish."""
        tally = self.tally
        for index, (kind, result) in enumerate(OUTCOMES):
            count = tally[index]
            if count:
                _frames_counter(kind, result).inc(count)
                tally[index] -= count


@functools.cache
def _frames_counter(kind: str, result: str) -> Counter:
    return FRAMES.labels(kind=kind, result=result)


_frames_of = operator.attrgetter("frames")
_last_window = operator.attrgetter("window")


def memoized(
    first: dict[int, Location], returns: dict[int, Location], addresses: Sequence[int]
) -> tuple[Location, ...] | None:
    """Every frame's memoized Location (first: innermost), or None when one is missing.

    At steady state most stacks are memoized whole: this runs their frames in C (map over
    dict lookups) instead of a bytecode loop per frame.
    """
    if not addresses:
        return ()
    try:
        return (first[addresses[0]], *map(returns.__getitem__, addresses[1:]))
    except KeyError:
        return None


def unnamed(locations: Sequence[Location]) -> int:
    """How many locations have no frames (counted in C, like memoized())."""
    return list(map(_frames_of, locations)).count(())


class AddressSpace:
    """One tuple of mappings: its index and the Locations memoized in it."""

    __slots__ = ("binaries", "expires", "first", "index", "returns", "unnamed", "used", "window")

    def __init__(self, mappings: tuple[Mapping, ...]) -> None:
        self.index = MappingIndex(mappings)
        self.first: dict[int, Location] = {}  # innermost frames, looked up at the address
        self.returns: dict[int, Location] = {}  # return addresses, looked up at address - 1
        # Whether a memoized Location has no frames: if none has (most processes), a
        # memoized stack's frames are all hits without looking at each.
        self.unnamed = False
        # time.monotonic() at which a memoized frame of a file that failed to open is due
        # to be retried, and the space dropped; 0: none.
        self.expires = 0.0
        self.binaries: set[str] = set()  # keys of the binaries the Locations came from
        self.used = False  # since the symbolizer last asked (binaries' LRU order)
        self.window = 0  # the last window that used it


class AddressSpaces:
    """AddressSpaces by mappings tuple (identity), least recently used out. Thread-safe."""

    def __init__(
        self,
        max_spaces: int = MAX_SPACES,
        max_locations: int = MAX_LOCATIONS,
        idle_windows: int = IDLE_WINDOWS,
    ) -> None:
        self._max_spaces = max_spaces
        self._max_locations = max_locations
        self._idle_windows = idle_windows
        self._window = 0
        self._spaces: OrderedDict[int, AddressSpace] = OrderedDict()
        self._locations = 0  # memoized in the spaces held
        self._lock = threading.Lock()

    def get(self, mappings: tuple[Mapping, ...]) -> AddressSpace:
        # Keyed by id(): hashing a tuple of dataclasses per stack would cost more than
        # the lookups it saves. The space keeps the tuple alive, so the id stays its own.
        key = id(mappings)
        with self._lock:
            space = self._spaces.get(key)
            if (
                space is None
                or space.index.mappings is not mappings
                or (space.expires and time.monotonic() >= space.expires)
            ):
                if space is not None:
                    self._drop(key)
                space = self._spaces[key] = AddressSpace(mappings)
                while len(self._spaces) > self._max_spaces:
                    self._drop(next(iter(self._spaces)))
            else:
                self._spaces.move_to_end(key)
            space.used = True
            space.window = self._window
        return space

    def end_window(self) -> int:
        """Drop the spaces no stack used in the last idle_windows windows; how many."""
        with self._lock:
            self._window += 1
            idle = idle_keys(self._spaces, _last_window, self._window - self._idle_windows)
            for key in idle:
                self._drop(key)
            return len(idle)

    def remember(
        self, space: AddressSpace, return_address: bool, address: int, location: Location
    ) -> None:
        memo = space.returns if return_address else space.first
        with self._lock:
            new = address not in memo
            memo[address] = location
            space.unnamed = space.unnamed or not location.frames
            if not new or self._spaces.get(id(space.index.mappings)) is not space:
                return  # a dropped space only serves the caller that still holds it
            self._locations += 1
            if self._locations > self._max_locations:
                self._spaces.clear()
                self._locations = 0

    def forget_binary(self, key: str) -> None:
        """Drop the spaces whose Locations came (partly) from binary `key`.

        A caller must add the key to space.binaries before it reads the binary's frames:
        then a space either is dropped here or was filled after the binary changed.
        """
        with self._lock:
            for space_key in [k for k, s in self._spaces.items() if key in s.binaries]:
                self._drop(space_key)

    def _drop(self, key: int) -> None:
        space = self._spaces.pop(key)
        self._locations -= len(space.first) + len(space.returns)

    def used_binaries(self) -> list[str]:
        """Binary keys of spaces used since the last call, least recently used space first."""
        keys: list[str] = []
        with self._lock:
            for space in self._spaces.values():
                if space.used:
                    space.used = False
                    keys.extend(space.binaries)
        return keys

    def __len__(self) -> int:
        return len(self._spaces)
