"""OTLP profiles Export: what a real ProfilesService server decodes."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.profiles.v1development import profiles_pb2 as prof

from agent.model import SeriesProfile
from tests.remote.backend import make_profile, sample_locations

LABELS = (
    ("container", "nginx"),
    ("container_id", "0123abcd"),
    ("namespace", "shop"),
    ("pod", "web-1"),
    ("service", "frontend"),
)


def _any(value: Any) -> object:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def _attributes(dictionary: Any, indices: Any) -> dict[str, object]:
    out = {}
    for index in indices:
        entry = dictionary.attribute_table[index]
        out[dictionary.string_table[entry.key_strindex]] = _any(entry.value)
    return out


def _stack_functions(dictionary: Any, stack_index: int) -> list[list[str]]:
    """Per location, leaf first: the function names of its lines (innermost first)."""
    names = []
    for location_index in dictionary.stack_table[stack_index].location_indices:
        location = dictionary.location_table[location_index]
        names.append(
            [
                dictionary.string_table[
                    dictionary.function_table[line.function_index].name_strindex
                ]
                for line in location.lines
            ]
        )
    return names


def _export(backends: Any, sinks: Any, profile: SeriesProfile) -> Any:
    backend = backends("otlp")
    sink = sinks(address=backend.address, protocol="otlp", node="node-a")
    sink.write(profile)
    assert sink.flush(60)
    (request,) = backend.recorder.requests
    return request


def test_dictionary_tables_start_with_the_empty_element(backends, sinks):
    request = _export(backends, sinks, make_profile(1, labels=LABELS))
    d = request.dictionary
    assert d.string_table[0] == ""
    assert len(set(d.string_table)) == len(d.string_table)  # interned
    for table, empty in (
        (d.mapping_table, prof.Mapping()),
        (d.location_table, prof.Location()),
        (d.function_table, prof.Function()),
        (d.link_table, prof.Link()),
        (d.attribute_table, prof.KeyValueAndUnit()),
        (d.stack_table, prof.Stack()),
    ):
        assert table[0] == empty
        assert all(entry != empty for entry in table[1:])


def test_samples_resolve_to_the_functions_sent(backends, sinks):
    profile = make_profile(2, labels=LABELS)
    request = _export(backends, sinks, profile)
    d = request.dictionary
    (resource_profiles,) = request.resource_profiles
    (profile_message,) = resource_profiles.scope_profiles[0].profiles
    expected = {
        sample.pid: [[frame.function for frame in loc.frames] for loc in sample.locations]
        for sample in profile.samples
    }
    got = {}
    for sample in profile_message.samples:
        attributes = _attributes(d, sample.attribute_indices)
        got[attributes["process.pid"]] = _stack_functions(d, sample.stack_index)
        count = next(s.count for s in profile.samples if s.pid == attributes["process.pid"])
        assert list(sample.values) == [count]
        assert attributes["thread.name"] in ("app", "worker")
    assert got == expected
    assert got[4242][1] == ["inlined_leaf", "outer_caller"]  # inline: innermost first
    assert got[4242][-1] == []  # an unsymbolized location has no lines


def test_profile_types_time_and_resource(backends, sinks):
    profile = make_profile(3, labels=LABELS)
    request = _export(backends, sinks, profile)
    d = request.dictionary
    (resource_profiles,) = request.resource_profiles
    resource = {kv.key: _any(kv.value) for kv in resource_profiles.resource.attributes}
    assert resource == {
        "host.name": "node-a",
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-1",
        "k8s.container.name": "nginx",
        "container.id": "0123abcd",
    }
    message = resource_profiles.scope_profiles[0].profiles[0]
    assert resource_profiles.scope_profiles[0].scope.name == "strobe"

    def value_type(vt: Any) -> tuple[str, str]:
        return d.string_table[vt.type_strindex], d.string_table[vt.unit_strindex]

    assert value_type(message.sample_type) == ("samples", "count")
    assert value_type(message.period_type) == ("cpu", "nanoseconds")
    assert message.period == profile.period_ns
    assert message.time_unix_nano == profile.start_ns
    assert message.duration_nano == profile.duration_ns
    assert len(message.profile_id) == 16 and any(message.profile_id)
    assert _attributes(d, message.attribute_indices) == {"service": "frontend"}


def test_mappings_and_frame_types(backends, sinks):
    request = _export(backends, sinks, make_profile(4, labels=LABELS))
    d = request.dictionary
    by_address = {loc.address: loc for loc in d.location_table[1:]}
    for location in sample_locations():
        message = by_address[location.address]
        frame_type = _attributes(d, message.attribute_indices)["profile.frame.type"]
        assert frame_type == ("kernel" if location.kernel else location.frame_type or "native")
        if location.mapping is None:
            assert message.mapping_index == 0
            continue
        mapping = d.mapping_table[message.mapping_index]
        assert d.string_table[mapping.filename_strindex] == location.mapping.path
        assert (mapping.memory_start, mapping.memory_limit, mapping.file_offset) == (
            location.mapping.start,
            location.mapping.end,
            location.mapping.offset,
        )
        build_id = _attributes(d, mapping.attribute_indices)
        assert build_id == {"process.executable.build_id.gnu": location.build_id}
    assert len(d.mapping_table) == 3  # the empty one + app + libc, shared by locations
