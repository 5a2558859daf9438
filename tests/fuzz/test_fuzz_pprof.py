"""build_pprof on arbitrary samples: extreme addresses and counts, empty stacks, any text in
names, paths and labels (non-UTF-8 bytes from ELF and /proc included), kernel and user
frames mixed, duplicate mappings. The result always parses back, is byte for byte what
protobuf serializes (samples are hand-encoded), holds the input counts,
refers only to what it defines, and the upstream pprof tool reads it."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.model import Frame, Location, Mapping, ProfileSample
from agent.pprof import build_pprof, parse_pprof
from agent.pprof.proto import profile_pb2
from tests.conftest import require_tool
from tests.fuzz import any_text, fuzz_settings

U64 = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
INT64 = st.one_of(st.sampled_from([0, 1, 2**63 - 1]), st.integers(0, 2**63 - 1))
PERIOD_NS = 52_631_578  # 19 Hz
START_NS, DURATION_NS = 1_700_000_000_000_000_000, 10_000_000_000
INT64_MAX = 2**63 - 1

MAPPINGS = st.builds(
    Mapping,
    start=U64,
    end=U64,
    offset=U64,
    path=st.one_of(st.sampled_from(["/usr/bin/x", "", "[vdso]"]), any_text),
)
FRAMES = st.builds(
    Frame,
    function=st.one_of(st.sampled_from(["main", "", "_ZN3foo3barEv"]), any_text),
    file=st.one_of(st.just(""), any_text),
    line=INT64,
    start_line=INT64,
)


@st.composite
def samples(draw: st.DrawFn) -> list[ProfileSample]:
    """Samples sharing a few mappings and locations, as one window's samples do."""
    mappings = draw(st.lists(MAPPINGS, min_size=1, max_size=3))
    mappings += draw(st.lists(st.sampled_from(mappings), max_size=2))  # duplicates by value
    build_ids = st.one_of(st.just(""), st.text("0123456789abcdef", max_size=40), any_text)

    def location() -> st.SearchStrategy[Location]:
        user = st.builds(
            Location,
            address=U64,
            mapping=st.one_of(st.none(), st.sampled_from(mappings)),
            build_id=build_ids,
            frames=st.lists(FRAMES, max_size=3).map(tuple),
        )
        kernel = st.builds(
            Location,
            address=U64,
            mapping=st.none(),
            frames=st.lists(FRAMES, max_size=1).map(tuple),
            kernel=st.just(True),
        )
        return st.one_of(user, kernel)

    pool = draw(st.lists(location(), min_size=1, max_size=8))
    stack = st.lists(st.one_of(st.sampled_from(pool), location()), max_size=6).map(tuple)
    label = st.tuples(st.one_of(st.sampled_from(["comm", "pid", "container"]), any_text), any_text)
    sample = st.builds(
        ProfileSample,
        locations=stack,
        count=st.one_of(st.integers(1, 1000), INT64),
        labels=st.lists(label, max_size=3).map(lambda pairs: tuple(sorted(pairs))),
        pid=st.one_of(st.just(0), st.integers(1, 2**22)),
    )
    return draw(st.lists(sample, max_size=6))


def check_profile(profile: profile_pb2.Profile, given_samples: list[ProfileSample]) -> None:
    """The invariants pprof's own CheckValid and our readers rely on."""
    strings = len(profile.string_table)
    assert profile.string_table[0] == ""
    assert len(profile.sample) == len(given_samples)
    assert [s.value[0] for s in profile.sample] == [s.count for s in given_samples]
    for sample, given_sample in zip(profile.sample, given_samples, strict=True):
        assert sample.value[1] == min(given_sample.count * PERIOD_NS, INT64_MAX)
        assert len(sample.location_id) == len(given_sample.locations)
    mapping_ids = [m.id for m in profile.mapping]
    location_ids = [loc.id for loc in profile.location]
    function_ids = [f.id for f in profile.function]
    for ids in (mapping_ids, location_ids, function_ids):
        assert 0 not in ids and len(set(ids)) == len(ids)
    assert all(i in set(location_ids) for s in profile.sample for i in s.location_id)
    for loc in profile.location:
        assert loc.mapping_id == 0 or loc.mapping_id in mapping_ids
        assert all(line.function_id in function_ids for line in loc.line)
    for mapping in profile.mapping:
        assert 0 <= mapping.filename < strings and 0 <= mapping.build_id < strings
    for function in profile.function:
        assert all(
            0 <= i < strings for i in (function.name, function.system_name, function.filename)
        )
    for sample in profile.sample:
        assert all(0 <= label.key < strings and 0 <= label.str < strings for label in sample.label)


def location_names(profile: profile_pb2.Profile) -> dict[int, list[str]]:
    functions = {f.id: profile.string_table[f.name] for f in profile.function}
    return {loc.id: [functions[line.function_id] for line in loc.line] for loc in profile.location}


def valid_utf8(text: str) -> str:
    """What a name becomes in a profile: each lone surrogate (undecodable byte) is U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


@fuzz_settings(150)
@given(samples())
@example([ProfileSample((Location(1, None, frames=(Frame("bad\udcff"),)),), 1)])
@example([ProfileSample((), INT64_MAX, (("comm", "\udc80"), ("pid", "\u00b2")), pid=0)])
def test_any_samples_make_a_valid_profile(given_samples: list[ProfileSample]) -> None:
    data = build_pprof(given_samples, START_NS, DURATION_NS, PERIOD_NS)
    profile = parse_pprof(data)
    check_profile(profile, given_samples)
    # Samples are hand-encoded: the bytes must be what protobuf itself would serialize.
    assert profile.SerializeToString() == gzip.decompress(data)
    names = location_names(profile)
    for sample, given_sample in zip(profile.sample, given_samples, strict=True):
        for location_id, location in zip(sample.location_id, given_sample.locations, strict=True):
            expected = [valid_utf8(f.function) for f in location.frames if f.function or f.file]
            assert names[location_id] == expected


@pytest.fixture(scope="module")
def pprof_tool() -> str:
    return require_tool("pprof")


@fuzz_settings(6)
@given(samples())
def test_upstream_pprof_reads_generated_profiles(
    pprof_tool: str, tmp_path_factory: pytest.TempPathFactory, given_samples: list[ProfileSample]
) -> None:
    """A handful of examples only: each runs the Go tool (slow)."""
    home = tmp_path_factory.mktemp("pprof")
    path = home / "cpu.pb.gz"
    path.write_bytes(build_pprof(given_samples, START_NS, DURATION_NS, PERIOD_NS))
    env = {**os.environ, "HOME": str(home), "PPROF_TMPDIR": str(home)}
    env.pop("PPROF_BINARY_PATH", None)
    result = subprocess.run(
        [pprof_tool, "-symbolize=none", "-raw", str(path)],
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Samples:" in result.stdout
    assert result.stdout.count("\n") >= len(given_samples)


def test_pprof_tool_sees_a_non_utf8_name(pprof_tool: str, tmp_path: Path) -> None:
    """A symbol name with undecodable bytes reaches pprof, as U+FFFD, next to a plain one."""
    location = Location(0x1000, None, frames=(Frame("spin\udcff\udcfe"), Frame("main")))
    path = tmp_path / "cpu.pb.gz"
    path.write_bytes(build_pprof([ProfileSample((location,), 7)], 0, 1, PERIOD_NS))
    env = {**os.environ, "HOME": str(tmp_path), "PPROF_TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [pprof_tool, "-symbolize=none", "-traces", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "spin\ufffd\ufffd" in result.stdout and "main" in result.stdout
