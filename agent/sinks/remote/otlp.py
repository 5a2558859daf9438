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
  profile_id (fixed at encode time, so a resend carries the same id). An off-CPU
  profile: sample_type off_cpu/nanoseconds, period_type wallclock/nanoseconds, period 0,
  values = [blocked ns], and the profile attribute profile_type=off-cpu (a series label).
- Samples: values = [count]; attributes process.pid (int), and the sample's labels
  (comm -> thread.name, tid -> thread.id, others as they are). Identical
  (stack, attributes) pairs are merged.
- ProfilesDictionary: index 0 of every table is the empty element; strings interned;
  stacks list locations leaf first; a location's lines hold inlined frames innermost
  first, caller last (as pprof); mappings carry process.executable.build_id.gnu;
  locations carry profile.frame.type (kernel / native / cpython).

Encoding handles every location reference of every profile, so it is written for speed
(see Dictionary): it writes the samples and the dictionary tables as wire bytes itself,
exactly as upb writes the same message (fields in number order, zero scalars left out,
repeated ints packed; tests/remote/test_otlp_encode.py and tests/fuzz/test_fuzz_otlp.py
decode and compare), from tables of small varints; only small messages go through upb.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import struct
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as svc
from opentelemetry.proto.common.v1 import common_pb2 as common
from opentelemetry.proto.profiles.v1development import profiles_pb2 as prof
from opentelemetry.proto.resource.v1 import resource_pb2 as resource

from agent.model import OFF_CPU, Location, Mapping, ProfileSample, SeriesProfile, valid_utf8
from agent.util.gcpause import cycle_collection_paused

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
FunctionKey = tuple[str, str, str, int]  # name, system name, file, start line


def any_value(value: AttrValue) -> common.AnyValue:
    if isinstance(value, int):
        return common.AnyValue(int_value=value)
    return common.AnyValue(string_value=valid_utf8(value))


def attribute(key: str, value: str) -> tuple[str, AttrValue]:
    """(key, typed value): ints for the integer conventions when the text is a number."""
    if key in INT_ATTRIBUTES and value.lstrip("-").isdigit():
        return key, int(value)
    return key, value


# -- protobuf wire format ------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_TABLE_LIMIT = 1 << 16  # values (not indices) this large are encoded as they come


def _int64(value: int) -> bytes:
    """The varint of an int64 field's value; ValueError out of range, as upb."""
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"Value out of range: {value}")
    return _varint(value)


def _varint(value: int) -> bytes:
    """The varint of an int32/int64 (negative: 64-bit two's complement) or uint64."""
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]
_pack_u16 = struct.Struct("<H").pack
_pack_u16_u8 = struct.Struct("<HB").pack


def _small_varints(start: int, stop: int) -> list[bytes]:
    """_varint(n) for n in range(start, stop), 128 values at a time: in a run of n
    sharing all but the low 7 bits, the varint read as a little-endian int is a constant
    plus those bits, so struct packs the run without Python code per value."""
    out: list[bytes] = []
    n = start
    while n < min(stop, 1 << 21):
        low, rest = n & 0x7F, n >> 7
        end = min(stop, n - low + 0x80)
        if not rest:
            out += _ONE_BYTE[n:end]
        elif rest < 0x80:  # (low | 0x80, rest)
            base = 0x80 | rest << 8
            out += map(_pack_u16, range(base + low, base + low + end - n))
        else:  # (low | 0x80, rest & 0x7F | 0x80, rest >> 7)
            base = 0x80 | (rest & 0x7F | 0x80) << 8
            out += map(
                _pack_u16_u8,
                range(base + low, base + low + end - n),
                itertools.repeat(rest >> 7, end - n),
            )
        n = end
    return out + [_varint(n) for n in range(max(start, 1 << 21), stop)]


def _continued_groups() -> list[bytes]:
    """The varint bytes of each 14-bit group n, both with the continuation bit:
    (n & 0x7F | 0x80, n >> 7 | 0x80)."""
    return list(
        itertools.chain.from_iterable(
            map(_pack_u16, range(0x8080 + (high << 8), 0x8100 + (high << 8)))
            for high in range(0x80)
        )
    )


class _Varints:
    """Varints of small ints from a table (`table`: 0, 1, 2 ... grown on demand, always
    the same list) and of addresses, for one request."""

    def __init__(self) -> None:
        self.table: list[bytes] = _small_varints(0, 0x80)
        self.low_groups: list[bytes] = []  # see add_high
        self.high: dict[int, bytes] = {}

    def cover(self, top: int) -> list[bytes]:
        """The table, holding at least 0..top."""
        table = self.table
        if top >= len(table):
            table += _small_varints(len(table), max(top + 1, 2 * len(table)))
        return table

    def column(self, values: Sequence[int]) -> Iterable[bytes]:
        """_varint of each value (from the table when they are all small)."""
        if values and min(values) >= 0 and max(values) < _TABLE_LIMIT:
            return map(self.cover(max(values)).__getitem__, values)
        return map(self.get, values)

    def get(self, value: int) -> bytes:
        """_varint(value), from the table when it is small."""
        table = self.table
        if 0 <= value < len(table):
            return table[value]
        if 0 <= value < _TABLE_LIMIT:
            return self.cover(value)[value]
        return _varint(value)

    def add_high(self, high: int) -> bytes:
        """The varint of high = address >> 28 (an address of 2**28 and up), memoized in
        `high` (one per 256 MiB of address space); `low_groups` then holds the varint
        bytes of each 14-bit group of the low 28 bits (continued)."""
        if not self.low_groups:
            self.low_groups += _continued_groups()
        varint = self.high[high] = _varint(high)
        return varint


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(body)) + body


def _repeated(tag: bytes, bodies: Iterable[bytes], varints: _Varints) -> bytes:
    """A repeated length-delimited field: each body with its tag and length."""
    bodies = list(bodies)
    sizes = list(map(len, bodies))
    if max(sizes, default=0) >= _TABLE_LIMIT:
        return b"".join(_field(tag, body) for body in bodies)
    table = varints.cover(max(sizes, default=0))
    return b"".join(
        itertools.chain.from_iterable(
            zip(itertools.repeat(tag), map(table.__getitem__, sizes), bodies, strict=False)
        )
    )


def _packed(tag: bytes, values: Iterable[int], varints: _Varints) -> bytes:
    """A packed repeated field of non-negative ints; b"" when there are none."""
    data = b"".join(map(varints.get, values))
    return _field(tag, data) if data else b""


# -- dictionary ----------------------------------------------------------------------


class Dictionary:
    """Interning tables of a ProfilesDictionary; index 0 of each is the empty element.

    This runs once per new location of a profile and per location reference, so it is
    written for that (few Python calls per location, none per reference): every table
    maps its key to its index in a dict, in first-seen order, and a new location or
    function is written as its wire bytes at once, indices as varints from a table.
    Location and Mapping objects are looked up by identity (kept alive here, so an id is
    never reused while the tables exist) before value: a location's bytes are its value
    as sent (mapping, address, lines, kind), so equal Locations share an index. A stack's
    key is its location indices as packed varints, which is what its Stack message holds.
    Entries are interned in the order the samples meet them, as when each table was a
    repeated field filled entry by entry (the bytes are the same as then).
    """

    def __init__(self) -> None:
        self.varints = _Varints()
        self._strings: dict[str, int] = {"": 0}
        self._attributes: dict[tuple[str, AttrValue], int] = {}
        self._attribute_rows: list[bytes] = []
        self._mappings: dict[tuple[Mapping, str], int] = {}
        self._mapping_rows: list[bytes] = []
        # id(Mapping) -> (build id, Location.mapping_index field)
        self._mapping_fields: dict[int, tuple[str, bytes]] = {}
        self._functions: dict[FunctionKey, tuple[bytes, bytes]] = {}  # see _function
        self._function_rows: list[bytes] = []
        # (kernel, frame_type) -> Location.attribute_indices field
        self._frame_types: dict[tuple[bool, str], bytes] = {}
        self._locations: dict[bytes | tuple[bytes, str], bytes] = {}  # -> index varint
        self._location_rows: list[bytes] = []
        self._by_identity: dict[int, bytes] = {}  # id(Location) -> its index varint
        self._alive: list[object] = []  # holds what is keyed by id() above
        self._stacks: dict[bytes, int] = {}

    def string(self, text: str) -> int:
        index = self._strings.get(text)
        if index is None:
            index = self._strings[text] = len(self._strings)
        return index

    def attribute(self, key: str, value: AttrValue) -> int:
        index = self._attributes.get((key, value))
        if index is None:
            index = self._attributes[(key, value)] = len(self._attributes) + 1
            entry = prof.KeyValueAndUnit(key_strindex=self.string(key), value=any_value(value))
            self._attribute_rows.append(entry.SerializeToString())
        return index

    def mapping(self, mapping: Mapping, build_id: str) -> int:
        index = self._mappings.get((mapping, build_id))
        if index is None:
            index = self._mappings[(mapping, build_id)] = len(self._mappings) + 1
            attributes = [self.attribute(BUILD_ID_ATTRIBUTE, build_id)] if build_id else []
            entry = prof.Mapping(
                memory_start=mapping.start,
                memory_limit=mapping.end,
                file_offset=mapping.offset,
                filename_strindex=self.string(mapping.path),
                attribute_indices=attributes,
            )
            self._mapping_rows.append(entry.SerializeToString())
        return index

    def stack(self, locations: Sequence[Location]) -> int:
        """The stack index of these locations (leaf first)."""
        find = self._by_identity.get
        indices: list[Any] = list(map(find, map(id, locations)))
        if None in indices:  # new Location objects (the Python work is per new one)
            self._alive.append(locations)
            position = -1
            for _ in range(indices.count(None)):
                position = indices.index(None, position + 1)
                location = locations[position]
                index = find(id(location))
                if index is None:
                    index = self._by_identity[id(location)] = self._location(location)
                indices[position] = index
        key = b"".join(indices)
        stack = self._stacks.get(key)
        if stack is None:
            stack = self._stacks[key] = len(self._stacks) + 1
        return stack

    def _location(self, location: Location) -> bytes:
        """The index varint of this Location: Location{mapping_index=1, address=2,
        lines=3 (Line{function_index=1, line=2}), attribute_indices=4 (frame type)}.
        (Written inline, with few calls: this runs for every new location.)"""
        varints = self.varints
        table = varints.table
        mapping = location.mapping
        build_id = location.build_id
        if mapping is None:
            mapping_field = b""
        else:
            known = self._mapping_fields.get(id(mapping))
            if known is not None and known[0] == build_id:
                mapping_field = known[1]
            else:
                mapping_field = self._new_mapping(mapping, build_id)
        high, low = divmod(location.address, 1 << 28)
        if high:
            if high >> 36:  # not a uint64
                raise ValueError(f"Value out of range: {location.address}")
            high_varint = varints.high.get(high)
            if high_varint is None:
                high_varint = varints.add_high(high)
            groups = varints.low_groups
            address_field = b"".join(
                (b"\x10", groups[low & 0x3FFF], groups[low >> 14], high_varint)
            )
        else:
            address_field = b"\x10" + _varint(low) if low else b""
        functions = self._functions
        lines = b""
        for frame in location.frames:
            key = (frame.function, frame.system_name, frame.file, frame.start_line)
            function = functions.get(key)
            if function is None:
                function = self._function(key)
            number = frame.line
            if 0 < number < 0x80:
                lines += function[1] + table[number]
            else:
                field = function[0]
                if number:
                    field += b"\x10" + _int64(number)
                lines += b"\x1a" + table[len(field)] + field  # len(field) < 0x80
        frame_type = self._frame_types.get(
            (location.kernel, location.frame_type)
        ) or self._new_frame_type(location)
        body = b"".join((mapping_field, address_field, lines, frame_type))
        # Location equality includes a build id the bytes do not carry without a mapping
        value = body if mapping is not None or not build_id else (body, build_id)
        index_varint = self._locations.get(value)
        if index_varint is None:
            rows = self._location_rows
            rows.append(body)
            index = len(rows)
            if index >= len(table):
                varints.cover(index)
            index_varint = self._locations[value] = table[index]
        return index_varint

    def _function(self, key: FunctionKey) -> tuple[bytes, bytes]:
        """A new function's Line.function_index field, and the start of a Line with it
        and a line number below 0x80 (all but that number's byte): Function{
        name_strindex=1, system_name_strindex=2 (the name's when it has none of its own),
        filename_strindex=3, start_line=4}."""
        function, system_name, file, start_line = key
        strings = self._strings
        name = strings.get(function)
        if name is None:
            name = strings[function] = len(strings)
        system = name
        if system_name:
            system = strings.get(system_name, -1)
            if system < 0:
                system = strings[system_name] = len(strings)
        filename = strings.get(file)
        if filename is None:
            filename = strings[file] = len(strings)
        varints = self.varints
        table = varints.table
        if len(strings) >= len(table):
            varints.cover(len(strings))
        rows = self._function_rows
        if name and filename and 0 < start_line < len(table):
            rows.append(
                b"".join(
                    (
                        b"\x08",
                        table[name],
                        b"\x10",
                        table[system],
                        b"\x18",
                        table[filename],
                        b"\x20",
                        table[start_line],
                    )
                )
            )
        else:
            rows.append(
                (b"\x08" + table[name] if name else b"")
                + (b"\x10" + table[system] if system else b"")
                + (b"\x18" + table[filename] if filename else b"")
                + (b"\x20" + _int64(start_line) if start_line else b"")
            )
        index = len(rows)
        if index >= len(table):
            varints.cover(index)
        field = b"\x08" + table[index]
        line_start = b"".join((b"\x1a", table[len(field) + 2], field, b"\x10"))
        entry = self._functions[key] = (field, line_start)
        return entry

    def _new_mapping(self, mapping: Mapping, build_id: str) -> bytes:
        field = b"\x08" + self.varints.get(self.mapping(mapping, build_id))
        self._mapping_fields[id(mapping)] = (build_id, field)
        return field

    def _new_frame_type(self, location: Location) -> bytes:
        kind = "kernel" if location.kernel else location.frame_type or "native"
        index = self.attribute(FRAME_TYPE_ATTRIBUTE, kind)
        field = _packed(b"\x22", [index], self.varints)
        self._frame_types[(location.kernel, location.frame_type)] = field
        return field

    def serialize(self) -> bytes:
        """The ProfilesDictionary as wire bytes; call it once all is interned."""
        varints = self.varints
        try:
            strings = list(map(str.encode, self._strings))
        except UnicodeEncodeError:  # lone surrogates from undecodable bytes
            strings = [valid_utf8(text).encode() for text in self._strings]
        stacks = list(
            map(
                b"".join,
                zip(
                    itertools.repeat(b"\x0a"),  # location_indices, packed
                    varints.column(list(map(len, self._stacks))),
                    self._stacks,
                    strict=False,
                ),
            )
        )
        if b"" in self._stacks:  # no locations: an empty Stack
            stacks[list(self._stacks).index(b"")] = b""
        # each table starts with its empty element; link_table has nothing else
        return b"".join(
            (
                b"\x0a\x00" + _repeated(b"\x0a", self._mapping_rows, varints),  # mapping_table
                b"\x12\x00" + _repeated(b"\x12", self._location_rows, varints),  # location_table
                b"\x1a\x00" + _repeated(b"\x1a", self._function_rows, varints),  # function_table
                b"\x22\x00",  # link_table = 4
                _repeated(b"\x2a", strings, varints),  # string_table = 5, "" first
                b"\x32\x00" + _repeated(b"\x32", self._attribute_rows, varints),  # attributes
                b"\x3a\x00" + _repeated(b"\x3a", stacks, varints),  # stack_table = 7
            )
        )


def sample_attributes(sample: ProfileSample) -> list[tuple[str, AttrValue]]:
    """The per-sample attributes; the series labels a sample also carries for pprof are
    the resource's attributes here already."""
    pairs = [
        attribute(SAMPLE_LABELS[name], value)
        for name, value in sample.labels
        if name in SAMPLE_LABELS
    ]
    if sample.pid and not any(key == "process.pid" for key, _ in pairs):
        pairs.append(("process.pid", sample.pid))
    return sorted(set(pairs), key=lambda pair: (pair[0], str(pair[1])))


def merge_samples(
    samples: Sequence[ProfileSample], tables: Dictionary, off_cpu: bool = False
) -> dict[tuple[int, tuple[int, ...]], int]:
    """(stack index, attribute indices) -> summed count (off-CPU: summed blocked ns), in
    first-seen order."""
    by_labels: dict[tuple[tuple[tuple[str, str], ...], int], tuple[int, ...]] = {}
    merged: dict[tuple[int, tuple[int, ...]], int] = {}
    stack_of = tables.stack
    for sample in samples:
        stack = stack_of(sample.locations)
        attributes = by_labels.get((sample.labels, sample.pid))
        if attributes is None:
            attributes = by_labels[(sample.labels, sample.pid)] = tuple(
                [tables.attribute(k, v) for k, v in sample_attributes(sample)]
            )
        key = (stack, attributes)
        merged[key] = merged.get(key, 0) + (sample.nanoseconds if off_cpu else sample.count)
    return merged


def _samples(merged: dict[tuple[int, tuple[int, ...]], int], varints: _Varints) -> bytes:
    """Profile.samples = 2: Sample{stack_index=1, attribute_indices=2, values=4}."""
    if not merged:
        return b""
    stacks, attributes = zip(*merged, strict=True)
    for count in (min(merged.values()), max(merged.values())):
        _int64(count)  # in range
    attribute_fields = {
        indices: _packed(b"\x12", indices, varints) for indices in dict.fromkeys(attributes)
    }
    values = list(varints.column(list(merged.values())))
    bodies = map(
        b"".join,
        zip(
            itertools.repeat(b"\x08"),  # stack_index: 1 and up
            varints.column(stacks),
            map(attribute_fields.__getitem__, attributes),
            itertools.repeat(b"\x22"),  # values = [count], packed
            varints.column(list(map(len, values))),
            values,
            strict=False,
        ),
    )
    return _repeated(b"\x12", bodies, varints)


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


def encode(profile: SeriesProfile, node: str, version: str | None = None) -> bytes:
    """The ExportProfilesServiceRequest for one profile, with its own dictionary."""
    with cycle_collection_paused():
        return _encode(profile, node, _version() if version is None else version)


def _encode(profile: SeriesProfile, node: str, version: str) -> bytes:
    tables = Dictionary()
    off_cpu = profile.kind == OFF_CPU
    value_type = ("off_cpu", "nanoseconds") if off_cpu else ("samples", "count")
    head = prof.Profile(
        sample_type=prof.ValueType(
            type_strindex=tables.string(value_type[0]), unit_strindex=tables.string(value_type[1])
        )
    )
    samples = _samples(merge_samples(profile.samples, tables, off_cpu), tables.varints)
    tail = prof.Profile(
        time_unix_nano=profile.start_ns,
        duration_nano=profile.duration_ns,
        period_type=prof.ValueType(
            type_strindex=tables.string("wallclock" if off_cpu else "cpu"),
            unit_strindex=tables.string("nanoseconds"),
        ),
        period=profile.period_ns,
        profile_id=uuid.uuid4().bytes,
        attribute_indices=profile_attributes(profile, tables),
    )
    # Profile: sample_type = 1 (head), samples = 2, the rest = 3 and up (tail)
    message = head.SerializeToString() + samples + tail.SerializeToString()
    scope = common.InstrumentationScope(name=SCOPE_NAME, version=version)
    scope_profiles = prof.ScopeProfiles(scope=scope).SerializeToString()
    scope_profiles += _field(b"\x12", message)  # ScopeProfiles.profiles = 2
    resource_profiles = prof.ResourceProfiles(
        resource=resource.Resource(attributes=resource_attributes(profile, node))
    ).SerializeToString()
    resource_profiles += _field(b"\x12", scope_profiles)  # ResourceProfiles.scope_profiles = 2
    return b"".join(
        (
            _field(b"\x0a", resource_profiles),  # resource_profiles = 1
            _field(b"\x12", tables.serialize()),  # dictionary = 2
        )
    )


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
