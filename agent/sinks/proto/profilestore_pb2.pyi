from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class WriteRawRequest(_message.Message):
    __slots__ = ("tenant", "series", "normalized")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    series: _containers.RepeatedCompositeFieldContainer[RawProfileSeries]
    normalized: bool
    def __init__(
        self,
        tenant: str | None = ...,
        series: _Iterable[RawProfileSeries | _Mapping] | None = ...,
        normalized: bool | None = ...,
    ) -> None: ...

class WriteRawResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RawProfileSeries(_message.Message):
    __slots__ = ("labels", "samples")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    labels: LabelSet
    samples: _containers.RepeatedCompositeFieldContainer[RawSample]
    def __init__(
        self,
        labels: LabelSet | _Mapping | None = ...,
        samples: _Iterable[RawSample | _Mapping] | None = ...,
    ) -> None: ...

class Label(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: str | None = ..., value: str | None = ...) -> None: ...

class LabelSet(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, labels: _Iterable[Label | _Mapping] | None = ...) -> None: ...

class RawSample(_message.Message):
    __slots__ = ("raw_profile", "executable_info")
    RAW_PROFILE_FIELD_NUMBER: _ClassVar[int]
    EXECUTABLE_INFO_FIELD_NUMBER: _ClassVar[int]
    raw_profile: bytes
    executable_info: _containers.RepeatedCompositeFieldContainer[ExecutableInfo]
    def __init__(
        self,
        raw_profile: bytes | None = ...,
        executable_info: _Iterable[ExecutableInfo | _Mapping] | None = ...,
    ) -> None: ...

class ExecutableInfo(_message.Message):
    __slots__ = ("elf_type", "load_segment")
    ELF_TYPE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    elf_type: int
    load_segment: LoadSegment
    def __init__(
        self, elf_type: int | None = ..., load_segment: LoadSegment | _Mapping | None = ...
    ) -> None: ...

class LoadSegment(_message.Message):
    __slots__ = ("offset", "vaddr")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VADDR_FIELD_NUMBER: _ClassVar[int]
    offset: int
    vaddr: int
    def __init__(self, offset: int | None = ..., vaddr: int | None = ...) -> None: ...
