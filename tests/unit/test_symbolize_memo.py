"""Memoized symbolization (agent/symbolize/memo.py) gives what a lookup per frame gives.

Processes are pid 0 with loader-made mappings of the test binaries (as in
test_symbolize_dwarf.py), so binaries are opened by host path and nothing needs to run.
Symbolizer.symbolize_address never reads the memo: it is the per-frame reference.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from agent.metrics import FRAMES
from agent.model import Location, Mapping, ProcessInfo, ProfileSample, StackSample, Window
from agent.pprof import build_pprof
from agent.symbolize.kallsyms import Kallsyms
from agent.symbolize.memo import AddressSpaces
from agent.symbolize.perfmap import PerfMaps
from agent.symbolize.symbolizer import Symbolizer
from agent.window_flow import Stages, window_profiles
from tests.symbolize.helpers import loader_mappings

KALLSYMS = Kallsyms.from_text("ffffffff81000000 T _stext\nffffffff81001000 T do_work\n")
JIT = Mapping(0x7E00_0000_0000, 0x7E00_0001_0000, 0, "", perms="r-xp")  # no perf map: misses
MISSING = Mapping(0x7D00_0000_0000, 0x7D00_0001_0000, 0, "/no/such/file", "fe:00", 1)


def process(binaries: list[Path], base: int = 0x7F50_0000_0000) -> ProcessInfo:
    mappings = [JIT, MISSING]
    for i, binary in enumerate(binaries):
        mappings.extend(loader_mappings(binary, base + i * 0x1000_0000))
    mappings.sort(key=lambda m: m.start)
    return ProcessInfo(0, 0, "t", str(binaries[0]), tuple(mappings))


def random_stacks(rng: random.Random, info: ProcessInfo, count: int) -> list[tuple[int, ...]]:
    """Stacks over a small pool of addresses (so frames repeat), some outside any mapping."""
    pool = [0x1000, JIT.start + 0x10]
    for m in info.mappings:
        pool += [rng.randrange(m.start, m.end) for _ in range(12)] + [m.start, m.end]
    return [tuple(rng.choice(pool) for _ in range(rng.randrange(0, 12))) for _ in range(count)]


def frame_counts() -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for metric in FRAMES.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[(sample.labels["kind"], sample.labels["result"])] += int(sample.value)
    return counts


def expected_counts(user: list[Location], kernel: list[Location]) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for location in user:
        jit = location.mapping is not None and location.mapping.path == ""
        counts[("jit" if jit else "user", "hit" if location.frames else "miss")] += 1
    for location in kernel:
        counts[("kernel", "hit" if location.frames else "miss")] += 1
    return counts


def reference(symbolizer: Symbolizer, info: ProcessInfo, stack: tuple[int, ...]) -> list[Location]:
    return [
        symbolizer.symbolize_address(info, address, return_address=depth > 0)
        for depth, address in enumerate(stack)
    ]


def kernel_reference(stack: tuple[int, ...]) -> list[Location]:
    locations = []
    for depth, address in enumerate(stack):
        frame = KALLSYMS.lookup(address - 1 if depth else address)
        frames = (frame,) if frame else ()
        locations.append(Location(address, None, frames=frames, kernel=True))
    return locations


def test_memoized_stacks_equal_per_frame_lookups(c_binaries: Path) -> None:
    info = process([c_binaries / "spin_pie", c_binaries / "libspin.so"])
    rng = random.Random(1)
    symbolizer = Symbolizer(kallsyms=KALLSYMS, perf_maps=PerfMaps(recheck_seconds=0))
    per_frame = Symbolizer(kallsyms=KALLSYMS, perf_maps=PerfMaps(recheck_seconds=0))
    kernel_stack = (0xFFFFFFFF81001010, 0xFFFFFFFF81001001, 0xFFFFFFFF81000000, 0x10)
    for round_ in range(3):  # the later rounds are served from the memo
        for stack in random_stacks(random.Random(round_), info, 200):
            kernel = kernel_stack[: rng.randrange(0, 5)]
            before = frame_counts()
            got = symbolizer.symbolize(info, stack, kernel)
            symbolizer.end_window()  # publishes the frame counts
            counted = frame_counts() - before
            user = reference(per_frame, info, stack)
            expected_kernel = kernel_reference(kernel)
            assert list(got) == expected_kernel + user
            assert counted == expected_counts(user, expected_kernel)


def test_repeated_frames_are_the_same_objects(c_binaries: Path) -> None:
    info = process([c_binaries / "spin_pie"])
    exe = next(m for m in info.mappings if m.path.endswith("spin_pie"))
    stack = (
        exe.start + 0x10,
        exe.start + 0x20,
        exe.start + 0x20,
        exe.start + 0x10,
        JIT.start + 0x10,
    )
    symbolizer = Symbolizer()
    first, second = symbolizer.symbolize(info, stack, ()), symbolizer.symbolize(info, stack, ())
    assert first == second
    assert second[1] is second[2] is first[1]  # one return address, one Location
    assert second[0] is first[0] and second[0] is not first[3]  # depth 0 looks up address
    assert second[4] == first[4] and second[4] is not first[4]  # JIT: never memoized
    same_tuple = ProcessInfo(0, 0, "t", info.exe, info.mappings)
    assert symbolizer.symbolize(same_tuple, stack, ())[1] is first[1]  # memo is per tuple
    rebuilt = ProcessInfo(0, 0, "t", info.exe, tuple(list(info.mappings)))
    again = symbolizer.symbolize(rebuilt, stack, ())
    assert again == first and again[1] is not first[1]


def test_dwarf_index_replaces_memoized_elf_frames(c_binaries: Path, tmp_path: Path) -> None:
    binary = c_binaries / "spin_pie"
    info = process([binary])
    exe = next(m for m in info.mappings if m.path == str(binary))
    stack = tuple(range(exe.start, exe.end, 0x40))
    symbolizer = Symbolizer(cache_dir=tmp_path)
    elf = symbolizer.symbolize(info, stack, ())
    assert any(loc.frames for loc in elf) and all(f.line == 0 for loc in elf for f in loc.frames)
    assert symbolizer.symbolize(info, stack, ()) == elf  # memoized
    assert symbolizer.prepare_pending() >= 1
    dwarf = symbolizer.symbolize(info, stack, ())
    assert any(f.line > 0 for loc in dwarf for f in loc.frames)
    assert list(dwarf) == reference(symbolizer, info, stack)


def test_an_evicted_binary_is_reopened_not_served_from_memo(c_binaries: Path) -> None:
    a, b = process([c_binaries / "spin_pie"]), process([c_binaries / "libspin.so"])
    stack_a, stack_b = (mapped_address(a, "spin_pie"),), (mapped_address(b, "libspin.so"),)
    symbolizer = Symbolizer(max_binaries=1)
    first = symbolizer.symbolize(a, stack_a, ())
    symbolizer.symbolize(b, stack_b, ())  # evicts spin_pie's binary
    again = symbolizer.symbolize(a, stack_a, ())
    assert again == first and again[0] is not first[0]
    assert symbolizer.binary_count() == 1


def test_memo_hits_keep_a_binary_recently_used(c_binaries: Path) -> None:
    names = ["spin_pie", "libspin.so", "three_leaves"]
    infos = [process([c_binaries / name]) for name in names]
    stacks = [(mapped_address(info, name),) for info, name in zip(infos, names, strict=True)]
    symbolizer = Symbolizer(max_binaries=2)
    first = [
        symbolizer.symbolize(info, stack, ()) for info, stack in zip(infos, stacks, strict=True)
    ]
    # three_leaves evicted spin_pie (least recently used); spin_pie again evicts libspin;
    # then three_leaves' process is served from the memo only, which counts as a use ...
    symbolizer.symbolize(infos[0], stacks[0], ())
    hot = symbolizer.symbolize(infos[2], stacks[2], ())
    assert hot[0] is first[2][0]
    symbolizer.symbolize(infos[1], stacks[1], ())  # ... and opening libspin evicts spin_pie
    assert symbolizer.symbolize(infos[2], stacks[2], ())[0] is hot[0]


def mapped_address(info: ProcessInfo, name: str) -> int:
    mapping = next(m for m in info.mappings if m.path.endswith(name))
    return mapping.start + 0x10


def test_pprof_is_the_same_with_shared_or_equal_locations(c_binaries: Path) -> None:
    info = process([c_binaries / "spin_pie", c_binaries / "libspin.so"])
    memoized, per_frame = Symbolizer(), Symbolizer()
    shared, equal = [], []
    for stack in random_stacks(random.Random(7), info, 300):
        if stack:
            shared.append(ProfileSample(memoized.symbolize(info, stack, ()), 1, (("pid", "0"),)))
            fresh = tuple(reference(per_frame, info, stack))  # a new object per frame
            equal.append(ProfileSample(fresh, 1, (("pid", "0"),)))
    assert build_pprof(shared, 0, 10, 1) == build_pprof(equal, 0, 10, 1)


def test_window_profiles_match_the_per_frame_reference(c_binaries: Path) -> None:
    info = process([c_binaries / "spin_pie", c_binaries / "libspin.so"])
    stacks = random_stacks(random.Random(3), info, 200)
    window = Window(
        0, 10, tuple(StackSample(1, 1, "t", s, (), 1 + i % 3) for i, s in enumerate(stacks))
    )
    per_frame = Symbolizer()

    def reference_symbolize(
        p: ProcessInfo | None, user: tuple[int, ...], kernel: tuple[int, ...]
    ) -> tuple[Location, ...]:
        assert p is not None
        return tuple(reference(per_frame, p, user))

    def labels(_: ProcessInfo | None, __: StackSample) -> tuple[tuple[str, str], ...]:
        return (("service", "t"),)

    memo = Stages(lambda pid, _: info, Symbolizer().symbolize, labels)
    fresh = Stages(lambda pid, _: info, reference_symbolize, labels)
    for _ in range(2):
        got = window_profiles(window, memo, 1000)
        want = window_profiles(window, fresh, 1000)
        assert [p.pprof for p in got] == [p.pprof for p in want]


def test_address_spaces_are_bounded() -> None:
    spaces = AddressSpaces(max_spaces=2, max_locations=3)
    tuples = [(Mapping(i, i + 1, 0, f"/lib/{i}"),) for i in range(4)]
    first = spaces.get(tuples[0])
    assert spaces.get(tuples[0]) is first
    spaces.remember(first, False, 1, Location(1, None))
    spaces.remember(first, False, 1, Location(1, None))  # the same address again: still 1
    spaces.get(tuples[1])
    spaces.get(tuples[2])  # evicts the least recently used, tuples[0], and its 1 Location
    assert len(spaces) == 2 and spaces.get(tuples[0]) is not first
    space = spaces.get(tuples[1])
    for address in range(3):
        spaces.remember(space, False, address, Location(address, None))
    assert len(spaces) == 2 and len(space.first) == 3
    spaces.remember(first, True, 8, Location(8, None))  # an evicted space: not counted
    assert len(spaces) == 2
    spaces.remember(space, True, 9, Location(9, None))  # over the budget: all dropped
    assert len(spaces) == 0


def test_spaces_no_window_used_lately_are_dropped() -> None:
    spaces = AddressSpaces(idle_windows=2)
    busy, idle = [(Mapping(i, i + 1, 0, f"/lib/{i}"),) for i in range(2)]
    idle_space = spaces.get(idle)
    spaces.remember(idle_space, False, 1, Location(1, None))
    busy_space = spaces.get(busy)
    assert spaces.end_window() == 0  # both used in the window that just ended
    spaces.get(busy)
    assert spaces.end_window() == 0  # idle was used one window ago: still kept
    assert spaces.get(busy) is busy_space
    assert spaces.end_window() == 1  # idle: unused for two windows
    assert len(spaces) == 1 and spaces.get(busy) is busy_space
    assert spaces.get(idle) is not idle_space  # a new, empty space if it runs again
