"""Value types shared by the pipeline stages.

sample (sampler) -> process (process) -> frames (symbolize) -> labels (labels)
-> pprof (pprof) -> sink (sinks). Each stage takes and returns these plain,
immutable values so that everything but the BPF and /proc edges tests without root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CPU = "cpu"  # profile kinds: on-CPU samples [samples/count, cpu/nanoseconds]
OFF_CPU = "off-cpu"  # blocked intervals [samples/count, off_cpu/nanoseconds]


@dataclass(frozen=True, slots=True)
class StackSample:
    """One aggregated stack from the kernel: how often `pid` ran this stack in a window."""

    pid: int  # tgid: the process
    tid: int  # the thread that was sampled (one of them, when aggregated per process)
    comm: str  # thread name at sample time
    user_stack: tuple[int, ...]  # instruction pointers, innermost first
    kernel_stack: tuple[int, ...]  # innermost first
    count: int  # on-CPU: samples; off-CPU: blocked intervals
    python_stack: tuple[int, ...] = ()  # the Python walker's words (agent/python/frames.py)
    nanoseconds: int = 0  # off-CPU: the intervals' total blocked time


@dataclass(frozen=True, slots=True)
class Window:
    """What one drain of the kernel maps produced."""

    start_ns: int  # wall clock, ns since the epoch
    end_ns: int
    samples: tuple[StackSample, ...]
    lost: dict[str, int] = field(default_factory=dict)  # reason -> samples lost in BPF
    off_cpu: tuple[StackSample, ...] = ()  # blocked intervals (with --off-cpu)


@dataclass(frozen=True, slots=True)
class Mapping:
    """One file-backed (or anonymous) line of /proc/PID/maps."""

    start: int
    end: int
    offset: int  # file offset of `start`
    path: str  # as the process sees it ("" for anonymous, "[vdso]" etc. for special)
    dev: str = ""  # "major:minor"
    inode: int = 0
    perms: str = "r-xp"

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What we know about a process, captured as early as we could."""

    pid: int
    start_time: int  # clock ticks since boot (/proc/PID/stat field 22): pid + this is unique
    comm: str
    exe: str
    mappings: tuple[Mapping, ...]
    cmdline: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Frame:
    """One function at a location; a location has several when calls were inlined."""

    function: str  # "" when unknown
    file: str = ""
    line: int = 0
    start_line: int = 0
    system_name: str = ""  # the raw (mangled) symbol when it differs from `function`


@dataclass(frozen=True, slots=True)
class Location:
    """A symbolized instruction address. frames: innermost (inlined) first, caller last."""

    address: int  # runtime address
    mapping: Mapping | None  # None for kernel frames
    build_id: str = ""  # hex GNU build id of the mapped file, if known
    frames: tuple[Frame, ...] = ()
    kernel: bool = False
    frame_type: str = ""  # "" native or kernel (by `kernel`); "cpython" for Python frames

    @property
    def symbolized(self) -> bool:
        return any(f.function for f in self.frames)


@dataclass(frozen=True, slots=True)
class ProfileSample:
    """A symbolized, labelled stack ready for pprof: locations innermost first."""

    locations: tuple[Location, ...]
    count: int
    labels: tuple[tuple[str, str], ...] = ()  # sorted (name, value) pairs
    pid: int = 0
    nanoseconds: int = 0  # off-CPU: blocked time (on-CPU time is count * period)


@dataclass(frozen=True, slots=True)
class SeriesProfile:
    """One profile for one series: what a sink stores or ships.

    `labels` are the bounded series labels (after relabeling); per-process detail
    (pid, comm) lives in the samples' pprof labels, never in the series.
    """

    labels: tuple[tuple[str, str], ...]
    start_ns: int
    duration_ns: int
    period_ns: int  # CPU nanoseconds one sample stands for
    samples: tuple[ProfileSample, ...]
    pprof: bytes  # the gzipped pprof of `samples`
    kind: str = CPU  # CPU or OFF_CPU: what the samples measure


def valid_utf8(text: str) -> str:
    """`text` with each lone surrogate (an undecodable byte from ELF or /proc) as U+FFFD,
    so protobuf string fields accept it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
