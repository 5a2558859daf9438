"""MappingIndex and ProcessCache.get_covering against the linear scans they replace."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.metrics import PROCESS_READ_ERRORS
from agent.model import Mapping, ProcessInfo
from agent.process.cache import ProcessCache, _Entry
from agent.process.mapindex import MappingIndex
from tests.conftest import metric_value
from tests.unit.test_process_reader import MAPS_A, fake_proc


def linear_find(mappings: Sequence[Mapping], address: int) -> Mapping | None:
    """The reference: the first mapping, in the given order, that contains address."""
    return next((m for m in mappings if m.contains(address)), None)


def disjoint_mappings(rng: random.Random, count: int) -> list[Mapping]:
    """Sorted, non-overlapping mappings with gaps (some zero-length), like /proc maps."""
    mappings, cursor = [], rng.randrange(0, 1 << 12)
    for i in range(count):
        start = cursor + rng.choice((0, 0, rng.randrange(1, 1 << 16)))  # adjacent or a gap
        end = start + rng.choice((0, rng.randrange(1, 1 << 16)))
        mappings.append(Mapping(start, end, 0, f"/lib/{i}"))
        cursor = end
    return mappings


def probes(rng: random.Random, mappings: Sequence[Mapping], count: int) -> list[int]:
    """Random addresses plus every boundary (start - 1, start, end - 1, end)."""
    top = max((m.end for m in mappings), default=1) + 16
    edges = [a + d for m in mappings for a in (m.start, m.end) for d in (-1, 0)]
    return [rng.randrange(0, top) for _ in range(count)] + [a for a in edges if a >= 0]


def overlapping_mappings(rng: random.Random) -> list[Mapping]:
    """Hand-built mappings that may overlap, nest, repeat a start or be empty/inverted."""
    mappings = []
    for i in range(rng.randrange(1, 20)):
        start = rng.randrange(0, 1 << 12)
        mappings.append(Mapping(start, start + rng.randrange(-8, 1 << 10), 0, f"/lib/{i}"))
    return mappings


@pytest.mark.parametrize("seed", range(40))
def test_bisection_matches_the_linear_scan(seed: int) -> None:
    rng = random.Random(seed)
    if seed % 4 == 3:
        mappings = overlapping_mappings(rng)  # the index then scans, like the reference
    else:
        mappings = disjoint_mappings(rng, rng.randrange(0, 40))
        if seed % 2:
            rng.shuffle(mappings)  # hand-built input need not be sorted
    index = MappingIndex(tuple(mappings))
    for address in probes(rng, mappings, 500):
        assert index.find(address) is linear_find(mappings, address), hex(address)


@pytest.mark.parametrize("seed", range(10))
def test_covers_matches_checking_every_address(seed: int) -> None:
    rng = random.Random(seed)
    mappings = tuple(disjoint_mappings(rng, 12))
    entry = _Entry(ProcessInfo(7, 100, "t", "/bin/t", mappings))
    candidates = probes(rng, mappings, 50) + [0]
    for _ in range(300):
        stack = tuple(rng.choice(candidates) for _ in range(rng.randrange(0, 8)))
        expected = all(linear_find(mappings, a) is not None for a in stack if a)
        assert entry.covers(stack) is expected
        assert entry.covers(iter(stack)) is expected  # any iterable, read once by the caller


def test_covers_forgets_what_it_knew_when_the_maps_are_replaced(tmp_path: Path) -> None:
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    assert cache.get_covering(7, (0x1800,)) is not None
    fake_proc(tmp_path, 7, 100, "a", "3000-4000 r-xp 00000000 fe:00 33 /lib/new\n")
    info = cache.get_covering(7, (0x3800,))  # unmapped: maps re-read, /bin/a is gone
    assert info is not None and [m.path for m in info.mappings] == ["/lib/new"]
    fake_proc(tmp_path, 7, 100, "a", MAPS_A + "3000-4000 r-xp 00000000 fe:00 33 /lib/new\n")
    # 0x1800 was covered by the old maps only: not covered now, and a re-read waits for
    # the next window.
    assert cache.get_covering(7, (0x1800,)) is info
    cache.end_window()
    info = cache.get_covering(7, (0x1800,))
    assert info is not None and len(info.mappings) == 2


def test_an_unreadable_pid_is_read_once_per_window(tmp_path: Path) -> None:
    cache = ProcessCache(proc=tmp_path)
    before = metric_value(PROCESS_READ_ERRORS, reason="vanished")
    assert cache.get(7) is None
    assert cache.get_covering(7, (0x1800,)) is None
    assert metric_value(PROCESS_READ_ERRORS, reason="vanished") == before + 1  # one read
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    assert cache.get(7) is None  # the window's samples were the vanished process's
    assert cache.capture(7) is not None  # a new process (exec event): read at once
    assert cache.get(7) is not None
    fake_proc(tmp_path, 8, 100, "b", MAPS_A)
    (tmp_path / "8" / "stat").rename(tmp_path / "8" / "stat.away")
    assert cache.get(8) is None
    (tmp_path / "8" / "stat.away").rename(tmp_path / "8" / "stat")
    assert cache.get(8) is None
    cache.end_window()  # next window: read again
    assert cache.get(8) is not None
