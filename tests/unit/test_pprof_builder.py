"""build_pprof: the pprof conventions, checked on the parsed-back Profile."""

from __future__ import annotations

import gzip

import pytest

from agent.model import Frame, Location, Mapping, ProfileSample
from agent.pprof import PprofError, build_pprof, encode_profile, parse_pprof
from agent.pprof.builder import KERNEL_MAPPING_NAME, varint
from agent.pprof.proto import profile_pb2

START_NS = 1_700_000_000_000_000_000
DURATION_NS = 10_000_000_000
PERIOD_NS = 10_101_010  # 99 Hz
BUILD_ID = "8f3a9c0b1d2e4f60718293a4b5c6d7e8f9a0b1c2"

SPIN = Mapping(0x5555_5555_4000, 0x5555_5555_6000, 0x1000, "/usr/bin/spin", "08:01", 1234)
LIBC = Mapping(0x7F00_0000_0000, 0x7F00_0010_0000, 0x28000, "/usr/lib/libc.so.6", "08:01", 99)


def kernel(address: int, name: str) -> Location:
    return Location(address, None, frames=(Frame(name),), kernel=True)


SYSCALL = kernel(0xFFFF_FFFF_8100_0010, "do_syscall_64")
ENTRY = kernel(0xFFFF_FFFF_8100_0020, "entry_SYSCALL_64")
# leaf() inlined into spin(): innermost first
INLINED = Location(
    0x5555_5555_4100,
    SPIN,
    BUILD_ID,
    (Frame("leaf", "spin.c", 10, 8), Frame("spin", "spin.c", 20, 15)),
)
MAIN = Location(0x5555_5555_4200, SPIN, BUILD_ID, (Frame("main", "spin.c", 30, 25),))
UNSYMBOLIZED = Location(0x7F00_0000_1234, LIBC, "")
OUTSIDE = Location(0x1000, None)  # an address in no mapping (JIT, vanished mapping)


def samples() -> list[ProfileSample]:
    main_copy = Location(MAIN.address, SPIN, BUILD_ID, (Frame("main", "spin.c", 30, 25),))
    return [
        ProfileSample(
            (SYSCALL, ENTRY, INLINED, MAIN), 3, (("comm", "spin"), ("pid", "42")), pid=42
        ),
        # same stack values, distinct objects: must intern to the same ids
        ProfileSample((INLINED, main_copy), 5, (("comm", "spin"), ("pid", "42")), pid=42),
        ProfileSample((UNSYMBOLIZED, MAIN), 2, (("comm", "worker"), ("pid", "43")), pid=43),
        ProfileSample((OUTSIDE,), 1, (("comm", "jit"), ("container", "c1")), pid=44),
    ]


@pytest.fixture(scope="module")
def profile() -> profile_pb2.Profile:
    return parse_pprof(build_pprof(samples(), START_NS, DURATION_NS, PERIOD_NS))


def string(profile: profile_pb2.Profile, index: int) -> str:
    return profile.string_table[index]


def function_names(profile: profile_pb2.Profile, location: profile_pb2.Location) -> list[str]:
    functions = {f.id: f for f in profile.function}
    return [string(profile, functions[line.function_id].name) for line in location.line]


def test_header_types_and_times(profile: profile_pb2.Profile) -> None:
    assert profile.string_table[0] == ""
    types = [(string(profile, t.type), string(profile, t.unit)) for t in profile.sample_type]
    assert types == [("samples", "count"), ("cpu", "nanoseconds")]
    period_type = (
        string(profile, profile.period_type.type),
        string(profile, profile.period_type.unit),
    )
    assert period_type == ("cpu", "nanoseconds")
    assert profile.period == PERIOD_NS
    assert profile.time_nanos == START_NS
    assert profile.duration_nanos == DURATION_NS


def test_ids_are_one_based_and_dense(profile: profile_pb2.Profile) -> None:
    for table in (profile.mapping, profile.location, profile.function):
        assert [entry.id for entry in table] == list(range(1, len(table) + 1))
    location_ids = {loc.id for loc in profile.location}
    mapping_ids = {m.id for m in profile.mapping} | {0}
    function_ids = {f.id for f in profile.function}
    for sample in profile.sample:
        assert set(sample.location_id) <= location_ids
    for loc in profile.location:
        assert loc.mapping_id in mapping_ids
        assert {line.function_id for line in loc.line} <= function_ids


def test_values_are_count_and_cpu_time(profile: profile_pb2.Profile) -> None:
    assert [list(s.value) for s in profile.sample] == [
        [count, count * PERIOD_NS] for count in (3, 5, 2, 1)
    ]


def test_tables_are_deduplicated(profile: profile_pb2.Profile) -> None:
    # 2 kernel + inlined + main + unsymbolized + outside; main_copy is MAIN again
    assert len(profile.location) == 6
    # do_syscall_64, entry_SYSCALL_64, leaf, spin, main
    assert len(profile.function) == 5
    # spin, libc, kernel
    assert len(profile.mapping) == 3
    assert len(set(profile.string_table)) == len(profile.string_table)
    assert profile.sample[0].location_id[2:] == profile.sample[1].location_id


def test_inline_frames_innermost_first(profile: profile_pb2.Profile) -> None:
    inlined = profile.location[profile.sample[0].location_id[2] - 1]
    assert inlined.address == INLINED.address
    assert function_names(profile, inlined) == ["leaf", "spin"]
    assert [line.line for line in inlined.line] == [10, 20]
    leaf = profile.function[inlined.line[0].function_id - 1]
    assert string(profile, leaf.filename) == "spin.c"
    assert leaf.start_line == 8


def test_mappings_carry_ranges_build_id_and_truthful_flags(
    profile: profile_pb2.Profile,
) -> None:
    by_name = {string(profile, m.filename): m for m in profile.mapping}
    spin = by_name["/usr/bin/spin"]
    assert (spin.memory_start, spin.memory_limit, spin.file_offset) == (
        SPIN.start,
        SPIN.end,
        SPIN.offset,
    )
    assert string(profile, spin.build_id) == BUILD_ID
    assert spin.has_functions and spin.has_filenames and spin.has_line_numbers
    assert spin.has_inline_frames
    libc = by_name["/usr/lib/libc.so.6"]
    assert not (libc.has_functions or libc.has_filenames or libc.has_line_numbers)
    assert string(profile, libc.build_id) == ""


def test_kernel_frames_get_the_kernel_mapping_last(profile: profile_pb2.Profile) -> None:
    # pprof reports the first mapping as the profile's main binary: never the kernel
    assert string(profile, profile.mapping[0].filename) != KERNEL_MAPPING_NAME
    kernel_mapping = profile.mapping[-1]
    assert string(profile, kernel_mapping.filename) == KERNEL_MAPPING_NAME
    assert kernel_mapping.has_functions and not kernel_mapping.has_filenames
    first_two = [profile.location[i - 1] for i in profile.sample[0].location_id[:2]]
    assert [loc.mapping_id for loc in first_two] == [kernel_mapping.id] * 2
    assert [function_names(profile, loc) for loc in first_two] == [
        ["do_syscall_64"],
        ["entry_SYSCALL_64"],
    ]


def test_unsymbolized_location_keeps_address_and_mapping(profile: profile_pb2.Profile) -> None:
    location = profile.location[profile.sample[2].location_id[0] - 1]
    assert location.address == UNSYMBOLIZED.address
    assert string(profile, profile.mapping[location.mapping_id - 1].filename) == LIBC.path
    assert len(location.line) == 0
    outside = profile.location[profile.sample[3].location_id[0] - 1]
    assert (outside.address, outside.mapping_id, len(outside.line)) == (OUTSIDE.address, 0, 0)


def test_sample_labels(profile: profile_pb2.Profile) -> None:
    def labels(sample: profile_pb2.Sample) -> dict[str, str | int]:
        return {
            string(profile, label.key): string(profile, label.str) if label.str else label.num
            for label in sample.label
        }

    assert labels(profile.sample[0]) == {"comm": "spin", "pid": 42}
    assert labels(profile.sample[2]) == {"comm": "worker", "pid": 43}
    # pid comes from ProfileSample.pid even when no "pid" label was given
    assert labels(profile.sample[3]) == {"comm": "jit", "container": "c1", "pid": 44}
    assert all(
        len(sample.label) == len({lb.key for lb in sample.label}) for sample in profile.sample
    )


def test_output_is_gzip_and_deterministic() -> None:
    data = build_pprof(samples(), START_NS, DURATION_NS, PERIOD_NS)
    assert data[:2] == b"\x1f\x8b"
    assert data == build_pprof(samples(), START_NS, DURATION_NS, PERIOD_NS)
    plain = gzip.decompress(data)
    assert plain == encode_profile(samples(), START_NS, DURATION_NS, PERIOD_NS)
    assert plain == profile_pb2.Profile.FromString(plain).SerializeToString()  # as protobuf's
    assert parse_pprof(plain) == parse_pprof(data)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63 - 1, -1, -300, -(2**63)])
def test_varint_is_protobufs(value: int) -> None:
    # Sample.value is packed int64: tag, length, then the varint.
    encoded = profile_pb2.Sample(value=[value]).SerializeToString()
    assert encoded == b"\x12" + bytes([len(varint(value))]) + varint(value)


def test_empty_profile_is_valid() -> None:
    profile = parse_pprof(build_pprof([], START_NS, DURATION_NS, PERIOD_NS))
    assert profile.string_table[0] == ""
    assert len(profile.sample) == len(profile.location) == len(profile.mapping) == 0
    assert len(profile.sample_type) == 2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x1f\x8b\x08\x00truncated",
        gzip.compress(b"\xff\xff\xff\xff not protobuf"),
        gzip.compress(profile_pb2.Profile(string_table=["x"]).SerializeToString()),
    ],
    ids=["empty", "truncated-gzip", "not-protobuf", "bad-string-table"],
)
def test_parse_rejects_what_is_not_a_profile(data: bytes) -> None:
    with pytest.raises(PprofError):
        parse_pprof(data)
