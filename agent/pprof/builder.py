"""Symbolized, labelled samples -> one gzipped pprof Profile (perftools.profiles).

Conventions (github.com/google/pprof/proto/profile.proto): string_table[0] == "";
mapping, location and function ids are 1-based; a Location's `line` list holds the
inlined frames innermost first; sample values line up with sample_type
[samples/count, cpu/nanoseconds]. This runs once per series per window on the hot path,
so every table is interned through plain dicts, protobuf messages are only created
once per unique mapping, function and location, and samples (most of a profile) are
written as wire bytes directly.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from agent.model import CPU, OFF_CPU, Frame, Location, ProfileSample
from agent.pprof.proto import profile_pb2
from agent.util.gcpause import cycle_collection_paused

KERNEL_MAPPING_NAME = "[kernel.kallsyms]"
KERNEL_MAPPING = -1  # placeholder mapping id of kernel locations until finish()
GZIP_LEVEL = 1  # what Go's runtime/pprof writes (BestSpeed); BENCHMARKS.md: ~3x faster than 6
INT64_MAX = 2**63 - 1  # sample values are int64
_SURROGATE = re.compile("[\ud800-\udfff]")
_SMALL_VARINTS = tuple(bytes((i,)) for i in range(0x80))
# Wire tags of length-delimited fields (field number << 3 | 2) written by hand below.
PROFILE_SAMPLE = b"\x12"  # Profile.sample = 2
SAMPLE_LOCATION_ID = b"\x0a"  # Sample.location_id = 1 (packed)
SAMPLE_VALUE = b"\x12"  # Sample.value = 2 (packed)
SAMPLE_LABEL = b"\x1a"  # Sample.label = 3

MappingKey = tuple[int, int, int, str, str]  # start, end, offset, path, build id
FunctionKey = tuple[str, str, str, int]  # name, system name, file, start line
LocationKey = tuple[int, int, tuple[Frame, ...]]  # mapping id, address, frames
LabelKey = tuple[int, tuple[tuple[str, str], ...]]


class PprofError(ValueError):
    """Bytes that are not a (gzipped) pprof Profile."""


@dataclass
class _MappingResolution:
    """What the locations of one mapping say about its symbols (pprof's has_* bits)."""

    locations: int = 0
    with_functions: int = 0
    with_filenames: int = 0
    with_line_numbers: int = 0
    inlined: bool = False

    def add(self, frames: tuple[Frame, ...]) -> None:
        self.locations += 1
        self.with_functions += bool(frames) and all(f.function for f in frames)
        self.with_filenames += bool(frames) and all(f.file for f in frames)
        self.with_line_numbers += bool(frames) and all(f.line for f in frames)
        self.inlined = self.inlined or len(frames) > 1

    def apply(self, mapping: profile_pb2.Mapping) -> None:
        # "has_X" tells pprof and backends that X is already resolved for EVERY location
        # (they skip symbolizing such a mapping), so it is set only when that is true.
        everything = self.locations
        mapping.has_functions = everything > 0 and self.with_functions == everything
        mapping.has_filenames = everything > 0 and self.with_filenames == everything
        mapping.has_line_numbers = everything > 0 and self.with_line_numbers == everything
        mapping.has_inline_frames = mapping.has_functions and self.inlined


class _ProfileTables:
    """Interns strings, mappings, functions, locations and label sets into a Profile."""

    def __init__(self, profile: profile_pb2.Profile) -> None:
        self.profile = profile
        self.strings: dict[str, int] = {"": 0}
        self._mappings: dict[MappingKey, int] = {}
        self._resolution: list[_MappingResolution] = []
        # Kernel locations get their mapping in finish(), after every user mapping: pprof
        # takes the first mapping for the profile's main binary ("File:" in its reports).
        self._kernel_locations: list[profile_pb2.Location] = []
        self._kernel_resolution = _MappingResolution()
        self._functions: dict[FunctionKey, int] = {}
        self._locations: dict[LocationKey, int] = {}
        # id(Location) -> its location id's varint: the caller's samples keep every Location
        # alive for the whole build, so ids cannot be reused; this skips hashing dataclasses.
        self.by_object: dict[int, bytes] = {}
        self._labels: dict[LabelKey, bytes] = {}

    def string(self, value: str) -> int:
        index = self.strings.get(value)
        if index is None:
            index = self.strings[value] = len(self.strings)
        return index

    def location_varint(self, location: Location) -> bytes:
        """The varint of `location`'s id, added on first sight (by value: mapping, address,
        frames)."""
        found = self.by_object.get(id(location))
        if found is not None:
            return found
        mapping_id = self._mapping_id(location)
        key = (mapping_id, location.address, location.frames)
        location_id = self._locations.get(key)
        if location_id is None:
            location_id = self._add_location(mapping_id, location.address, location.frames)
            self._locations[key] = location_id
        found = self.by_object[id(location)] = varint(location_id)
        return found

    def _add_location(self, mapping_id: int, address: int, frames: tuple[Frame, ...]) -> int:
        location_id = len(self._locations) + 1
        frames = tuple(f for f in frames if f.function or f.file)  # a line needs a function
        lines = [profile_pb2.Line(function_id=self._function_id(f), line=f.line) for f in frames]
        kernel = mapping_id == KERNEL_MAPPING
        location = self.profile.location.add(
            id=location_id, mapping_id=0 if kernel else mapping_id, address=address, line=lines
        )
        if kernel:
            self._kernel_locations.append(location)
            self._kernel_resolution.add(frames)
        elif mapping_id:
            self._resolution[mapping_id - 1].add(frames)
        return location_id

    def _mapping_id(self, location: Location) -> int:
        if location.kernel:
            return KERNEL_MAPPING
        if location.mapping is None:
            return 0  # an address outside every known mapping: pprof allows mapping_id 0
        m = location.mapping
        key = (m.start, m.end, m.offset, m.path, location.build_id)
        mapping_id = self._mappings.get(key)
        if mapping_id is None:
            mapping_id = self._mappings[key] = self._add_mapping(key)
            self._resolution.append(_MappingResolution())
        return mapping_id

    def _add_mapping(self, key: MappingKey) -> int:
        mapping_id = len(self.profile.mapping) + 1
        start, end, offset, path, build_id = key
        self.profile.mapping.add(
            id=mapping_id,
            memory_start=start,
            memory_limit=end,
            file_offset=offset,
            filename=self.string(path),
            build_id=self.string(build_id),
        )
        return mapping_id

    def _function_id(self, frame: Frame) -> int:
        # The demangled name is the name; the raw symbol, when the frame kept one, the system name.
        system_name = frame.system_name or frame.function
        key = (frame.function, system_name, frame.file, frame.start_line)
        function_id = self._functions.get(key)
        if function_id is None:
            function_id = self._functions[key] = len(self._functions) + 1
            self.profile.function.add(
                id=function_id,
                name=self.string(frame.function),
                system_name=self.string(system_name),
                filename=self.string(frame.file),
                start_line=frame.start_line,
            )
        return function_id

    def labels(self, sample: ProfileSample) -> bytes:
        """The sample's encoded Label fields: `pid` numeric, every other label a string."""
        key = (sample.pid, sample.labels)
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = self._encode_labels(sample.pid, sample.labels)
        return labels

    def _encode_labels(self, pid: int, pairs: tuple[tuple[str, str], ...]) -> bytes:
        labels = []
        for name, value in pairs:
            if name == "pid" and value.isascii() and value.isdigit() and len(value) < 19:
                pid = pid or int(value)
                continue
            labels.append(profile_pb2.Label(key=self.string(name), str=self.string(value)))
        if pid:
            labels.append(profile_pb2.Label(key=self.string("pid"), num=pid))
        return b"".join(_field(SAMPLE_LABEL, label.SerializeToString()) for label in labels)

    def finish(self) -> None:
        """Add the kernel mapping, set every mapping's has_* bits, write the string table."""
        resolutions = list(self._resolution)
        if self._kernel_locations:
            # One mapping for all kernel text; its range is unknown here (kallsyms only).
            kernel_id = self._add_mapping((0, 0, 0, KERNEL_MAPPING_NAME, ""))
            for location in self._kernel_locations:
                location.mapping_id = kernel_id
            resolutions.append(self._kernel_resolution)
        for mapping, resolution in zip(self.profile.mapping, resolutions, strict=True):
            resolution.apply(mapping)
        try:
            self.profile.string_table.extend(self.strings)
        except UnicodeEncodeError:  # undecodable bytes of ELF symbols or /proc paths
            del self.profile.string_table[:]
            self.profile.string_table.extend(_SURROGATE.sub("\ufffd", s) for s in self.strings)


# Sample types by profile kind, and the period type: off-CPU intervals are measured in
# wall-clock time (Parca Agent's off-CPU type is parca_agent:samples:count:wallclock:...).
SAMPLE_TYPES = {
    CPU: (("samples", "count"), ("cpu", "nanoseconds")),
    OFF_CPU: (("samples", "count"), ("off_cpu", "nanoseconds")),
}
PERIOD_TYPES = {CPU: "cpu", OFF_CPU: "wallclock"}


def build_pprof(
    samples: Sequence[ProfileSample],
    start_ns: int,
    duration_ns: int,
    period_ns: int,
    kind: str = CPU,
) -> bytes:
    """The gzipped, serialized pprof Profile of `samples` (what every sink ships)."""
    data = encode_profile(samples, start_ns, duration_ns, period_ns, kind)
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def encode_profile(
    samples: Sequence[ProfileSample],
    start_ns: int,
    duration_ns: int,
    period_ns: int,
    kind: str = CPU,
) -> bytes:
    """The serialized Profile, byte for byte what protobuf's serializer would write.

    Samples are most of a profile and each would be a protobuf message made and copied
    from Python objects, so they are written as wire bytes here, between the Profile's
    field 1 (sample_type) and the fields after 2, which protobuf serializes.
    """
    head = profile_pb2.Profile()
    tail = profile_pb2.Profile(time_nanos=start_ns, duration_nanos=duration_ns, period=period_ns)
    tables = _ProfileTables(tail)
    for name, unit in SAMPLE_TYPES[kind]:
        head.sample_type.add(type=tables.string(name), unit=tables.string(unit))
    tail.period_type.type = tables.string(PERIOD_TYPES[kind])
    tail.period_type.unit = tables.string("nanoseconds")
    with cycle_collection_paused():  # a bytes object or two per sample, no cycles
        encoded = _encode_samples(samples, tables, None if kind == OFF_CPU else period_ns)
    tables.finish()
    return head.SerializeToString() + encoded + tail.SerializeToString()


def _encode_samples(
    samples: Sequence[ProfileSample], tables: _ProfileTables, period_ns: int | None
) -> bytes:
    """Sample fields; the second value is count * period_ns, or with no period (off-CPU)
    the sample's own nanoseconds."""
    # Hot loop: most locations repeat (the symbolizer hands out the same Location object
    # for a process's repeated frames), so their ids' varints are found by object, in C
    # (map, join), and only a stack with a location not seen yet calls out per location.
    known, location_varint = tables.by_object.__getitem__, tables.location_varint
    values: dict[int, bytes] = {}
    out = []
    for sample in samples:
        try:
            ids = b"".join(map(known, map(id, sample.locations)))
        except KeyError:
            ids = b"".join(map(location_varint, sample.locations))
        if period_ns is None:
            nanoseconds = min(sample.nanoseconds, INT64_MAX)
            value = _field(SAMPLE_VALUE, varint(sample.count) + varint(nanoseconds))
        else:
            cached = values.get(sample.count)
            if cached is None:
                cpu = min(sample.count * period_ns, INT64_MAX)
                cached = values[sample.count] = _field(
                    SAMPLE_VALUE, varint(sample.count) + varint(cpu)
                )
            value = cached
        body = (_field(SAMPLE_LOCATION_ID, ids) if ids else b"") + value + tables.labels(sample)
        out.append(_field(PROFILE_SAMPLE, body))
    return b"".join(out)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of an int64 or uint64 (a negative int64 as its two's
    complement, ten bytes, as protobuf writes it)."""
    if value < 0x80:
        if value >= 0:
            return _SMALL_VARINTS[value]
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + varint(len(payload)) + payload


def parse_pprof(data: bytes) -> profile_pb2.Profile:
    """A Profile from gzipped (or plain) serialized bytes; PprofError if it is not one."""
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as exc:
        raise PprofError(f"not a gzipped pprof profile: {exc}") from None
    profile = profile_pb2.Profile()
    try:
        profile.ParseFromString(raw)
    except DecodeError as exc:
        raise PprofError(f"not a pprof profile: {exc}") from None
    if not profile.string_table or profile.string_table[0] != "":
        raise PprofError('not a pprof profile: string_table[0] must be ""')
    return profile
