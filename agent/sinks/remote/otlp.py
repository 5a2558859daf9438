"""OTLP profiles: one SeriesProfile -> one ExportProfilesServiceRequest.

Built from the model types (SeriesProfile.samples), not from the pprof bytes, for
opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export
(opentelemetry-proto pinned, the protocol is still "development").

- One ResourceProfiles per request. Resource attributes follow the semantic
  conventions: host.name (configured node, else the `node` series label),
  k8s.namespace.name / k8s.pod.name / k8s.container.name / container.id from the
  series labels namespace / pod / container / container_id. Other series labels become
  profile attributes under their own names.
- One Profile: sample_type samples/count, period_type cpu/nanoseconds, period =
  CPU ns one sample stands for; time_unix_nano/duration_nano from the window; a random
  profile_id (fixed at encode time, so a resend carries the same id).
- Samples: values = [count]; attributes process.pid (int), and the sample's labels
  (comm -> thread.name, tid -> thread.id, others as they are). Identical
  (stack, attributes) pairs are merged.
- ProfilesDictionary: index 0 of every table is the empty element; strings interned;
  stacks list locations leaf first; a location's lines hold inlined frames innermost
  first, caller last (as pprof); mappings carry process.executable.build_id.gnu;
  locations carry profile.frame.type (kernel / native).
"""

from __future__ import annotations

import functools
import importlib.metadata
import uuid
from collections.abc import Iterable

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as svc
from opentelemetry.proto.common.v1 import common_pb2 as common
from opentelemetry.proto.profiles.v1development import profiles_pb2 as prof
from opentelemetry.proto.resource.v1 import resource_pb2 as resource

from agent.model import Frame, Location, Mapping, ProfileSample, SeriesProfile, valid_utf8

METHOD = "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"
SCOPE_NAME = "strobe"
RESOURCE_LABELS = {
    "namespace": "k8s.namespace.name",
    "pod": "k8s.pod.name",
    "container": "k8s.container.name",
    "container_id": "container.id",
}
SAMPLE_LABELS = {"comm": "thread.name", "tid": "thread.id", "pid": "process.pid"}
INT_ATTRIBUTES = frozenset({"process.pid", "thread.id"})
BUILD_ID_ATTRIBUTE = "process.executable.build_id.gnu"
FRAME_TYPE_ATTRIBUTE = "profile.frame.type"

AttrValue = str | int


def any_value(value: AttrValue) -> common.AnyValue:
    if isinstance(value, int):
        return common.AnyValue(int_value=value)
    return common.AnyValue(string_value=valid_utf8(value))


def attribute(key: str, value: str) -> tuple[str, AttrValue]:
    """(key, typed value): ints for the integer conventions when the text is a number."""
    if key in INT_ATTRIBUTES and value.lstrip("-").isdigit():
        return key, int(value)
    return key, value


class Dictionary:
    """Interning tables of a ProfilesDictionary; index 0 of each is the empty element."""

    def __init__(self) -> None:
        self.message = prof.ProfilesDictionary(
            mapping_table=[prof.Mapping()],
            location_table=[prof.Location()],
            function_table=[prof.Function()],
            link_table=[prof.Link()],
            string_table=[""],
            attribute_table=[prof.KeyValueAndUnit()],
            stack_table=[prof.Stack()],
        )
        self._strings: dict[str, int] = {"": 0}
        self._attributes: dict[tuple[str, AttrValue], int] = {}
        self._functions: dict[tuple[str, str, str, int], int] = {}
        self._mappings: dict[tuple[Mapping, str], int] = {}
        self._locations: dict[Location, int] = {}
        self._by_identity: dict[int, int] = {}
        self._stacks: dict[tuple[int, ...], int] = {}

    def string(self, text: str) -> int:
        index = self._strings.get(text)
        if index is None:
            index = self._strings[text] = len(self.message.string_table)
            self.message.string_table.append(valid_utf8(text))
        return index

    def attribute(self, key: str, value: AttrValue) -> int:
        index = self._attributes.get((key, value))
        if index is None:
            index = self._attributes[(key, value)] = len(self.message.attribute_table)
            entry = prof.KeyValueAndUnit(key_strindex=self.string(key), value=any_value(value))
            self.message.attribute_table.append(entry)
        return index

    def function(self, frame: Frame) -> int:
        key = (frame.function, frame.system_name, frame.file, frame.start_line)
        index = self._functions.get(key)
        if index is None:
            index = self._functions[key] = len(self.message.function_table)
            name = self.string(frame.function)
            entry = prof.Function(
                name_strindex=name,
                system_name_strindex=self.string(frame.system_name) if frame.system_name else name,
                filename_strindex=self.string(frame.file),
                start_line=frame.start_line,
            )
            self.message.function_table.append(entry)
        return index

    def mapping(self, mapping: Mapping, build_id: str) -> int:
        index = self._mappings.get((mapping, build_id))
        if index is None:
            index = self._mappings[(mapping, build_id)] = len(self.message.mapping_table)
            attributes = [self.attribute(BUILD_ID_ATTRIBUTE, build_id)] if build_id else []
            entry = prof.Mapping(
                memory_start=mapping.start,
                memory_limit=mapping.end,
                file_offset=mapping.offset,
                filename_strindex=self.string(mapping.path),
                attribute_indices=attributes,
            )
            self.message.mapping_table.append(entry)
        return index

    def location(self, location: Location) -> int:
        # Most locations repeat as the same object: look them up by identity first
        # (the profile keeps them alive while the request is built).
        index = self._by_identity.get(id(location))
        if index is not None:
            return index
        index = self._by_identity[id(location)] = self._add_location(location)
        return index

    def _add_location(self, location: Location) -> int:
        index = self._locations.get(location)
        if index is None:
            index = self._locations[location] = len(self.message.location_table)
            mapping = location.mapping
            frame_type = "kernel" if location.kernel else "native"
            entry = prof.Location(
                mapping_index=self.mapping(mapping, location.build_id) if mapping else 0,
                address=location.address,
                lines=[
                    prof.Line(function_index=self.function(frame), line=frame.line)
                    for frame in location.frames
                ],
                attribute_indices=[self.attribute(FRAME_TYPE_ATTRIBUTE, frame_type)],
            )
            self.message.location_table.append(entry)
        return index

    def stack(self, locations: Iterable[Location]) -> int:
        key = tuple(self.location(location) for location in locations)
        index = self._stacks.get(key)
        if index is None:
            index = self._stacks[key] = len(self.message.stack_table)
            self.message.stack_table.append(prof.Stack(location_indices=key))
        return index


def sample_attributes(sample: ProfileSample) -> list[tuple[str, AttrValue]]:
    pairs = [attribute(SAMPLE_LABELS.get(name, name), value) for name, value in sample.labels]
    if sample.pid and not any(key == "process.pid" for key, _ in pairs):
        pairs.append(("process.pid", sample.pid))
    return sorted(set(pairs), key=lambda pair: (pair[0], str(pair[1])))


def build_samples(samples: Iterable[ProfileSample], tables: Dictionary) -> list[prof.Sample]:
    merged: dict[tuple[int, tuple[int, ...]], int] = {}
    for sample in samples:
        stack = tables.stack(sample.locations)
        attributes = tuple(tables.attribute(k, v) for k, v in sample_attributes(sample))
        merged[(stack, attributes)] = merged.get((stack, attributes), 0) + sample.count
    return [
        prof.Sample(stack_index=stack, attribute_indices=attributes, values=[count])
        for (stack, attributes), count in merged.items()
    ]


def resource_attributes(profile: SeriesProfile, node: str) -> list[common.KeyValue]:
    labels = dict(profile.labels)
    pairs = [("host.name", node or labels.get("node", ""))]
    pairs += [(key, labels.get(name, "")) for name, key in RESOURCE_LABELS.items()]
    return [common.KeyValue(key=k, value=any_value(v)) for k, v in pairs if v]


def profile_attributes(profile: SeriesProfile, tables: Dictionary) -> list[int]:
    skipped = {*RESOURCE_LABELS, "node"}
    return [
        tables.attribute(name, value)
        for name, value in profile.labels
        if name not in skipped and value
    ]


def build_request(
    profile: SeriesProfile, node: str, version: str = ""
) -> svc.ExportProfilesServiceRequest:
    """The ExportProfilesServiceRequest for one profile, with its own dictionary."""
    tables = Dictionary()
    message = prof.Profile(
        sample_type=prof.ValueType(
            type_strindex=tables.string("samples"), unit_strindex=tables.string("count")
        ),
        samples=build_samples(profile.samples, tables),
        time_unix_nano=profile.start_ns,
        duration_nano=profile.duration_ns,
        period_type=prof.ValueType(
            type_strindex=tables.string("cpu"), unit_strindex=tables.string("nanoseconds")
        ),
        period=profile.period_ns,
        profile_id=uuid.uuid4().bytes,
        attribute_indices=profile_attributes(profile, tables),
    )
    scope = common.InstrumentationScope(name=SCOPE_NAME, version=version)
    resource_profiles = prof.ResourceProfiles(
        resource=resource.Resource(attributes=resource_attributes(profile, node)),
        scope_profiles=[prof.ScopeProfiles(scope=scope, profiles=[message])],
    )
    return svc.ExportProfilesServiceRequest(
        resource_profiles=[resource_profiles], dictionary=tables.message
    )


def encode(profile: SeriesProfile, node: str) -> bytes:
    return build_request(profile, node, _version()).SerializeToString()


def rejection(response: bytes) -> str:
    """ "" when all was accepted, else the server's partial-success message."""
    partial = svc.ExportProfilesServiceResponse.FromString(response).partial_success
    if partial.rejected_profiles:
        return f"{partial.rejected_profiles} rejected: {partial.error_message}"
    return ""


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("strobe")
    except importlib.metadata.PackageNotFoundError:  # run from a plain checkout
        return ""
