"""otlp.encode without a server: the request decodes to exactly what the model says.

The encoder writes the samples and the dictionary tables as wire bytes itself, so these
tests decode every table back, resolve every index, and compare with the SeriesProfile;
they also check the bytes are what upb writes for the decoded message (canonical), and
that the tables hold each entry once.
"""

from __future__ import annotations

import gc
import random
from typing import Any

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as svc

from agent.model import Frame, Location, Mapping, ProfileSample, SeriesProfile, valid_utf8
from agent.sinks.remote import otlp

MAIN = Mapping(start=0x400000, end=0x800000, offset=0, path="/usr/bin/app")
LIB = Mapping(start=0x7F0000000000, end=0x7F0000800000, offset=0x1000, path="/lib/libc.so.6")
BUILD_ID = "ab" * 20


def decode(data: bytes) -> tuple[Any, list[tuple[object, ...]]]:
    """The request, and its samples with every index resolved: (stack, attributes,
    values), a stack being its locations (mapping, address, lines, attributes)."""
    request = svc.ExportProfilesServiceRequest.FromString(data)
    assert request.SerializeToString() == data  # what upb writes for this message
    d = request.dictionary
    strings = list(d.string_table)

    def attributes(indices: Any) -> tuple[tuple[str, object], ...]:
        entries = [d.attribute_table[i] for i in indices]
        values = [getattr(e.value, e.value.WhichOneof("value")) for e in entries]
        return tuple((strings[e.key_strindex], v) for e, v in zip(entries, values, strict=True))

    def mapping(index: int) -> object:
        if index == 0:
            return None
        m = d.mapping_table[index]
        return (
            m.memory_start,
            m.memory_limit,
            m.file_offset,
            strings[m.filename_strindex],
            attributes(m.attribute_indices),
        )

    def line(entry: Any) -> tuple[object, ...]:
        f = d.function_table[entry.function_index]
        names = (f.name_strindex, f.system_name_strindex, f.filename_strindex)
        return (*(strings[i] for i in names), f.start_line, entry.line)

    def location(index: int) -> tuple[object, ...]:
        loc = d.location_table[index]
        lines = tuple(line(entry) for entry in loc.lines)
        return (mapping(loc.mapping_index), loc.address, lines, attributes(loc.attribute_indices))

    (profile,) = request.resource_profiles[0].scope_profiles[0].profiles
    samples = [
        (
            tuple(location(i) for i in d.stack_table[s.stack_index].location_indices),
            attributes(s.attribute_indices),
            list(s.values),
        )
        for s in profile.samples
    ]
    return request, samples


def expected_location(location: Location) -> tuple[object, ...]:
    mapping = location.mapping
    if mapping is not None:
        build_id = location.build_id
        attributes = ((otlp.BUILD_ID_ATTRIBUTE, valid_utf8(build_id)),) if build_id else ()
        mapping = (mapping.start, mapping.end, mapping.offset, valid_utf8(mapping.path), attributes)
    lines = tuple(
        (*map(valid_utf8, (f.function, f.system_name or f.function, f.file)), f.start_line, f.line)
        for f in location.frames
    )
    kind = "kernel" if location.kernel else "native"
    return (mapping, location.address, lines, ((otlp.FRAME_TYPE_ATTRIBUTE, kind),))


def expected_samples(profile: SeriesProfile) -> list[tuple[object, ...]]:
    """Equal (locations, attributes) merged, in first-seen order; text as valid UTF-8."""
    merged: dict[tuple[object, ...], int] = {}
    for sample in profile.samples:
        key = (sample.locations, tuple(otlp.sample_attributes(sample)))
        merged[key] = merged.get(key, 0) + sample.count
    return [
        (
            tuple(expected_location(loc) for loc in locations),
            tuple((valid_utf8(k), valid_utf8(v) if isinstance(v, str) else v) for k, v in pairs),
            [count],
        )
        for (locations, pairs), count in merged.items()
    ]


def assert_tables_hold_each_entry_once(request: Any) -> None:
    d = request.dictionary
    assert d.string_table[0] == ""
    assert len(set(d.string_table)) == len(d.string_table)
    for table in (
        d.mapping_table,
        d.location_table,
        d.function_table,
        d.attribute_table,
        d.stack_table,
    ):
        entries = [entry.SerializeToString() for entry in table]
        assert entries[0] == b""  # the empty element
        assert len(set(entries)) == len(entries)


def profile_of(
    samples: list[ProfileSample], labels: tuple[tuple[str, str], ...] = ()
) -> SeriesProfile:
    return SeriesProfile(labels, 1_700_000_000_000_000_000, 10**10, 52_631_578, tuple(samples), b"")


def test_edge_values_and_shared_or_equal_objects() -> None:
    main_copy = Mapping(MAIN.start, MAIN.end, MAIN.offset, MAIN.path)  # equal, not the same
    leaf = Location(0x400123, MAIN, BUILD_ID, (Frame("leaf", "app.c", 10, 5),))
    leaf_copy = Location(0x400123, main_copy, BUILD_ID, (Frame("leaf", "app.c", 10, 5),))
    inlined = Location(
        0x400200,
        MAIN,
        BUILD_ID,
        (Frame("inl", "app.h", 200, 70_000, "_Z3inlv"), Frame("outer", "app.c", 1 << 40, 0)),
    )
    odd = Location(0x400300, MAIN, BUILD_ID, (Frame("neg", "", -1, -(1 << 63)),))
    unknown = Location(0x7F0000000456, LIB, "", (Frame("", "libc.c"),))  # no name, no build id
    zero = Location(0, None)  # address 0, no lines
    low = Location(0x1000, None, frames=(Frame("low", "x.c", 127, 128),))
    kernel = Location(0xFFFFFFFF81000010, None, frames=(Frame("do_syscall"),), kernel=True)
    top = Location(2**64 - 1, None, frames=(Frame("top"),), kernel=True)
    samples = [
        ProfileSample((leaf, inlined, leaf, kernel), 3, (("comm", "app"), ("pid", "7")), 7),
        ProfileSample(
            (leaf_copy, inlined, leaf_copy, kernel), 4, (("comm", "app"), ("pid", "7")), 7
        ),
        ProfileSample((odd, unknown, zero, low, top), 2**40, (("tid", "9"), ("x", "y")), 0),
        ProfileSample((kernel, leaf), 1, (("comm", "app"),), 8),
    ]
    profile = profile_of(samples, (("namespace", "shop"), ("service", "web")))
    request, decoded = decode(otlp.encode(profile, "node-a"))
    assert decoded == expected_samples(profile)
    assert len(decoded) == 3  # the copy's stack is the same stack: merged, 3 + 4
    assert decoded[0][2] == [7]
    assert_tables_hold_each_entry_once(request)
    d = request.dictionary
    assert len(d.location_table) == 1 + 8  # leaf and its copy are one location
    assert len(d.mapping_table) == 1 + 2


def test_an_empty_stack_and_a_zero_count() -> None:
    profile = profile_of([ProfileSample((), 0, (("comm", "idle"),), 1)])
    _, decoded = decode(otlp.encode(profile, "n"))
    assert (
        decoded
        == expected_samples(profile)
        == [((), (("process.pid", 1), ("thread.name", "idle")), [0])]
    )


def test_a_mappingless_build_id_tells_locations_apart_as_location_equality_does() -> None:
    with_id = Location(0x5000, None, "cd" * 20, (Frame("f"),))
    without = Location(0x5000, None, "", (Frame("f"),))
    profile = profile_of([ProfileSample((with_id,), 1), ProfileSample((without,), 2)])
    request, decoded = decode(otlp.encode(profile, "n"))
    assert decoded == expected_samples(profile)
    assert len(request.dictionary.location_table) == 1 + 2


def busy_profile(stacks: int, seed: int = 1) -> SeriesProfile:
    """Many functions and locations (indices past 2**14: three-byte varints), shared
    call paths, kernel frames, a few inlined frames, labels that repeat."""
    rng = random.Random(seed)
    mappings = [
        Mapping(0x10000000 * (b + 1), 0x10000000 * (b + 2), 0, f"/lib{b}.so") for b in range(6)
    ]
    sites = [
        Location(
            mappings[f % 6].start + f * 0x40,
            mappings[f % 6],
            f"{f % 6:02x}" * 20,
            (Frame(f"fn{f}", f"src{f % 50}.c", f % 3000, f % 2000),)
            + ((Frame(f"inl{f}", "inl.h", f % 7),) if f % 9 == 0 else ()),
        )
        for f in range(30_000)
    ]
    kernel = [
        Location(0xFFFFFFFF81000000 + k * 16, None, frames=(Frame(f"k{k}"),), kernel=True)
        for k in range(50)
    ]
    samples = []
    previous: list[Location] = []
    for _ in range(stacks):
        stack = previous[: rng.randrange(len(previous) + 1)]
        stack += [rng.choice(sites) for _ in range(rng.randint(1, 12))]
        previous = stack
        user = tuple(reversed(stack))
        pid = rng.randrange(20)
        labels = (("comm", f"worker-{pid % 5}"), ("pid", str(pid)))
        locations = tuple(rng.sample(kernel, 3)) + user if rng.random() < 0.3 else user
        samples.append(ProfileSample(locations, rng.randint(1, 300), labels, pid))
    return profile_of(samples, (("node", "host-1"), ("pod", "p")))


def test_a_busy_profile_decodes_to_its_samples() -> None:
    profile = busy_profile(4000)
    request, decoded = decode(otlp.encode(profile, ""))
    assert decoded == expected_samples(profile)
    assert_tables_hold_each_entry_once(request)
    assert len(request.dictionary.location_table) > 1 << 14


def test_undecodable_text_is_replaced_everywhere() -> None:
    location = Location(
        0x400000, Mapping(1, 2, 0, "/bin/\udcff"), "", (Frame("f\udc80", "s\udc81.c"),)
    )
    profile = profile_of([ProfileSample((location,), 1, (("comm", "a\udcfe"),), 3)])
    request, decoded = decode(otlp.encode(profile, "n"))
    ((stack, attributes, _),) = decoded
    (((_, _, _, path, _), _, lines, _),) = stack
    assert path == "/bin/\ufffd"
    assert lines == (("f\ufffd", "f\ufffd", "s\ufffd.c", 0, 0),)
    assert ("thread.name", valid_utf8("a\udcfe")) in attributes


def test_the_cycle_collector_is_as_it_was() -> None:
    profile = busy_profile(50)
    assert gc.isenabled()
    otlp.encode(profile, "n")
    assert gc.isenabled()
    gc.disable()
    try:
        otlp.encode(profile, "n")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_values_out_of_range_are_refused_as_upb_refuses_them() -> None:
    too_big = Location(2**64, None, frames=(Frame("f"),))
    huge_line = Location(0x400000, MAIN, "", (Frame("f", "", 2**63),))
    for stack, count in (((too_big,), 1), ((huge_line,), 1), ((), 2**63)):
        try:
            otlp.encode(profile_of([ProfileSample(stack, count)]), "n")
        except ValueError:
            continue
        raise AssertionError(f"{stack} {count} encoded")
