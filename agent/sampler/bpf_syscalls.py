"""The bpf(2) and perf_event_open(2) system calls through ctypes: no bcc, no LLVM.

Once a BPF program is loaded (see `agent.sampler.compile_parent`), everything the
agent does with it is a handful of syscalls on file descriptors: read and write
maps, ask the kernel what a map or program is, open cpu-clock perf events and
attach the program to them, attach raw tracepoints. This module is those calls.

Every failed call raises OSError with the errno set (so `FileNotFoundError`,
`PermissionError`, ... subclasses apply) and a message naming the call and object.
Struct layouts follow include/uapi/linux/{bpf,perf_event}.h; tests compare them
against the installed headers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# (bpf, perf_event_open) syscall numbers per architecture.
_SYSCALL_NUMBERS = {"x86_64": (321, 298), "aarch64": (280, 241)}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_ENABLE_STATS = 32

# enum bpf_map_type (the ones the agent meets)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_STACK_TRACE = 7
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_STATS_RUN_TIME = 0
BPF_OBJ_NAME_LEN = 16

# perf_event_open
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
_ATTR_DISABLED = 1 << 0  # bits of perf_event_attr's flags word
_ATTR_FREQ = 1 << 10
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

# A batch op the kernel lacks for a map type fails with one of these.
ENOTSUPP = 524  # kernel-internal, leaks to user space from bpf(2)
_BATCH_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP})

_u8, _u16, _u32, _s32, _u64 = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_int32,
    ctypes.c_uint64,
)


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", _u32),
        ("btf_fd", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("map_extra", _u64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", _u32),
        ("expected_attach_type", _u32),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", _u32),
        ("pad", _u32),
        ("key", _u64),
        ("value", _u64),  # also next_key
        ("flags", _u64),
    ]


class _MapBatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", _u64),
        ("out_batch", _u64),
        ("keys", _u64),
        ("values", _u64),
        ("count", _u32),
        ("map_fd", _u32),
        ("elem_flags", _u64),
        ("flags", _u64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", _u64), ("prog_fd", _u32)]


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", _u32)]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("btf_id", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("pad", _u32),  # btf_vmlinux_id in newer kernels
        ("map_extra", _u64),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", _u8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("gpl_compatible", _u32),  # a 1-bit field and 31 bits of padding
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
        ("recursion_misses", _u64),
        ("verified_insns", _u32),
        ("attach_btf_obj_id", _u32),
        ("attach_btf_id", _u32),
    ]


class _PerfEventAttr(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("size", _u32),
        ("config", _u64),
        ("sample_freq", _u64),  # union with sample_period
        ("sample_type", _u64),
        ("read_format", _u64),
        ("flags", _u64),  # bit field: disabled, inherit, ..., freq (bit 10), ...
        ("wakeup_events", _u32),
        ("bp_type", _u32),
        ("config1", _u64),
        ("config2", _u64),
        ("branch_sample_type", _u64),
        ("sample_regs_user", _u64),
        ("sample_stack_user", _u32),
        ("clockid", _s32),
        ("sample_regs_intr", _u64),
        ("aux_watermark", _u32),
        ("sample_max_stack", _u16),
        ("__reserved_2", _u16),
        ("aux_sample_size", _u32),
        ("__reserved_3", _u32),
        ("sig_data", _u64),
        ("config3", _u64),
    ]


def _syscall_numbers() -> tuple[int, int]:
    machine = platform.machine()
    if machine not in _SYSCALL_NUMBERS:
        raise OSError(errno.ENOSYS, f"bpf syscalls: unsupported architecture {machine}")
    return _SYSCALL_NUMBERS[machine]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    """syscall(2) with ints passed as longs; returns the result or raises OSError."""
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(ctypes.c_long(number), *converted))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


_CMD_NAMES = {
    value: name
    for name, value in globals().items()
    if name.startswith(("BPF_MAP_", "BPF_OBJ_", "BPF_RAW_", "BPF_ENABLE_", "BPF_PROG_L"))
    and not name.startswith("BPF_MAP_TYPE_")
    and name != "BPF_OBJ_NAME_LEN"
}


def bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(cmd, &attr, sizeof attr). `what` names the object for the error message."""
    try:
        return _syscall(_syscall_numbers()[0], cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    except OSError as exc:
        name = _CMD_NAMES.get(cmd, str(cmd))
        raise OSError(exc.errno, f"bpf({name}) on {what}: {exc.strerror}") from None


def _c_buffer(data: bytes, size: int, what: str) -> ctypes.Array[ctypes.c_char]:
    if len(data) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(data)}")
    return ctypes.create_string_buffer(data, size)


def _address(buffer: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buffer is None else ctypes.addressof(buffer)


# ---------------------------------------------------------------- object info


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str  # as the kernel keeps it: at most 15 characters


@dataclass(frozen=True)
class ProgInfo:
    prog_type: int
    id: int
    name: str  # at most 15 characters
    run_time_ns: int  # counted only while run-time stats are enabled
    run_cnt: int
    recursion_misses: int


def _object_info(fd: int, info: ctypes.Structure, what: str) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)


def map_info(fd: int) -> MapInfo:
    """What the kernel knows about the map behind `fd`."""
    info = _MapInfo()
    _object_info(fd, info, f"map fd {fd}")
    return MapInfo(
        map_type=info.type,
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


def prog_info(fd: int) -> ProgInfo:
    """What the kernel knows about the program behind `fd`, with its run statistics."""
    info = _ProgInfo()
    _object_info(fd, info, f"program fd {fd}")
    return ProgInfo(
        prog_type=info.type,
        id=info.id,
        name=info.name.decode(errors="replace"),
        run_time_ns=info.run_time_ns,
        run_cnt=info.run_cnt,
        recursion_misses=info.recursion_misses,
    )


def enable_run_time_stats() -> int:
    """Make the kernel count run_cnt/run_time_ns of every program while the returned
    fd stays open (BPF_ENABLE_STATS; costs a little per program run)."""
    return bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME), "run-time stats")


def create_map(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    name: str = "",
    flags: int = 0,
) -> int:
    """BPF_MAP_CREATE; returns the new map's fd (close-on-exec)."""
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[: BPF_OBJ_NAME_LEN - 1],
    )
    return bpf(BPF_MAP_CREATE, attr, f"new map {name!r} (type {map_type})")


VERIFIER_LOG_BYTES = 1 << 20


def load_program(
    prog_type: int, insns: bytes, license: str, name: str, kern_version: int = 0
) -> int:
    """BPF_PROG_LOAD of ready instructions (map fds already in place); returns the fd.

    On refusal the load is tried again with the verifier's log, which the OSError's
    message then ends with."""
    insn_buffer = ctypes.create_string_buffer(insns, len(insns))
    license_buffer = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(insn_buffer),
        license=ctypes.addressof(license_buffer),
        kern_version=kern_version,
        prog_name=name.encode()[: BPF_OBJ_NAME_LEN - 1],
    )
    try:
        return bpf(BPF_PROG_LOAD, attr, f"program {name!r}")
    except OSError as exc:
        log = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return bpf(BPF_PROG_LOAD, attr, f"program {name!r}")  # passes: a transient refusal
        except OSError:
            tail = log.value.decode(errors="replace")[-4000:]
            raise OSError(exc.errno, f"{exc.strerror}\n--- verifier log ---\n{tail}") from None


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw-tracepoint program; it stays attached while the returned fd is open."""
    encoded = ctypes.create_string_buffer(name.encode())
    attr = _RawTracepointAttr(name=ctypes.addressof(encoded), prog_fd=prog_fd)
    return bpf(BPF_RAW_TRACEPOINT_OPEN, attr, f"raw tracepoint {name!r}")


# ---------------------------------------------------------------- perf events


def _read_cpu_list(path: Path) -> list[int]:
    """Parse a kernel CPU list such as "0-3,8,10-11"."""
    cpus: list[int] = []
    for part in path.read_text().strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus() -> list[int]:
    return _read_cpu_list(Path("/sys/devices/system/cpu/online"))


def possible_cpu_count() -> int:
    """Number of per-CPU values a per-CPU map lookup returns."""
    return len(_read_cpu_list(Path("/sys/devices/system/cpu/possible")))


def open_cpu_clock_event(
    cpu: int, frequency: int | None = None, *, sample_period_ns: int | None = None, pid: int = -1
) -> int:
    """perf_event_open for the software cpu-clock on `cpu` (every process when pid=-1).

    Exactly one of `frequency` (samples per second, freq mode) and `sample_period_ns`.
    The event is opened disabled: `attach_perf_event` sets the program, then enables.
    """
    if (frequency is None) == (sample_period_ns is None):
        raise ValueError("give exactly one of frequency and sample_period_ns")
    period = frequency if frequency is not None else sample_period_ns
    if period is None or period <= 0:
        raise ValueError(f"sampling frequency/period must be positive, got {period}")
    flags = _ATTR_DISABLED | (_ATTR_FREQ if frequency is not None else 0)
    attr = _PerfEventAttr(
        type=PERF_TYPE_SOFTWARE,
        size=ctypes.sizeof(_PerfEventAttr),
        config=PERF_COUNT_SW_CPU_CLOCK,
        sample_freq=period,
        flags=flags,
    )
    try:
        return _syscall(
            _syscall_numbers()[1], ctypes.byref(attr), pid, cpu, -1, PERF_FLAG_FD_CLOEXEC
        )
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EINVAL and frequency is not None:
            hint = " (above /proc/sys/kernel/perf_event_max_sample_rate?)"
        raise OSError(
            exc.errno, f"perf_event_open(cpu-clock, cpu {cpu}, pid {pid}): {exc.strerror}{hint}"
        ) from None


def attach_perf_event(perf_fd: int, prog_fd: int) -> None:
    """Run the perf_event program on every sample of the event, and enable the event.

    The program stays attached until `perf_fd` is closed."""
    for request, arg, what in (
        (PERF_EVENT_IOC_SET_BPF, prog_fd, f"PERF_EVENT_IOC_SET_BPF(prog fd {prog_fd})"),
        (PERF_EVENT_IOC_ENABLE, 0, "PERF_EVENT_IOC_ENABLE"),
    ):
        try:
            fcntl.ioctl(perf_fd, request, arg)
        except OSError as exc:
            raise OSError(exc.errno, f"ioctl {what} on perf fd {perf_fd}: {exc.strerror}") from None
