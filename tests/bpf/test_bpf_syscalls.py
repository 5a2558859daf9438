"""bpf(2)/perf_event_open(2) wrappers, BpfMap and RingBuffer against the real kernel.

Maps are made with BPF_MAP_CREATE directly (no bcc). The ring buffer is fed by a
small raw-tracepoint program compiled in a child (compile_in_child): every getppid()
of this process emits one record, so the test controls exactly what is written.
Struct layouts and constants are checked against the installed uapi headers by gcc.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sampler import bpf_syscalls as bs
from agent.sampler.bpf_map import BpfMap
from agent.sampler.compile_parent import CompiledProgram, compile_in_child
from agent.sampler.kernel_headers import find_kernel_headers
from agent.sampler.ringbuf import RingBuffer, record_span
from tests.conftest import require_tool

pytestmark = pytest.mark.bpf

GETPPID = {"x86_64": 110, "aarch64": 173}

# One record per getppid() of the target process: seq % 3 == 0 -> 12-byte record,
# 1 -> 20-byte record, 2 -> reserved then discarded. stats: [seq, dropped, discarded].
PRODUCER = r"""
struct small { u32 seq; u32 pid; u32 tag; };
struct large { u32 seq; u32 pid; u32 tag; u32 times7; u32 inverted; };
BPF_ARRAY(target, u32, 1);
BPF_ARRAY(stats, u64, 3);
BPF_RINGBUF_OUTPUT(events, 1);

static __always_inline void bump(u32 index) {
    u64 *n = stats.lookup(&index);
    if (n)
        (*n)++;
}

int on_sys_enter(struct bpf_raw_tracepoint_args *ctx) {
    if (ctx->args[1] != TRIGGER_NR)
        return 0;
    u32 zero = 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u32 *wanted = target.lookup(&zero);
    u64 *seqp = stats.lookup(&zero);
    if (!wanted || *wanted != pid || !seqp)
        return 0;
    u32 seq = *seqp;
    *seqp = seq + 1;  // the test triggers one call at a time
    if (seq % 3 == 0) {
        struct small e = {.seq = seq, .pid = pid, .tag = 0xA0};
        if (events.ringbuf_output(&e, sizeof(e), 0))
            bump(1);
    } else if (seq % 3 == 1) {
        struct large e = {.seq = seq, .pid = pid, .tag = 0xB1, .times7 = seq * 7,
                          .inverted = ~seq};
        if (events.ringbuf_output(&e, sizeof(e), 0))
            bump(1);
    } else {
        struct small *e = events.ringbuf_reserve(sizeof(struct small));
        if (!e) {
            bump(1);
            return 0;
        }
        e->seq = seq;
        events.ringbuf_discard(e, 0);
        bump(2);
    }
    return 0;
}
"""


# ------------------------------------------------------------------ layouts


def _layout_checks() -> list[str]:
    """C static assertions: every ctypes field's offset and size, and the constants."""
    structs = [
        (bs._MapCreateAttr, "union bpf_attr", "", set()),
        (bs._MapElemAttr, "union bpf_attr", "", {"pad"}),
        (bs._MapBatchAttr, "union bpf_attr", "batch.", set()),
        (bs._InfoAttr, "union bpf_attr", "info.", set()),
        (bs._RawTracepointAttr, "union bpf_attr", "raw_tracepoint.", set()),
        (bs._EnableStatsAttr, "union bpf_attr", "enable_stats.", set()),
        (bs._MapInfo, "struct bpf_map_info", "", {"pad"}),
        (bs._ProgInfo, "struct bpf_prog_info", "", {"gpl_compatible"}),
        (bs._PerfEventAttr, "struct perf_event_attr", "", {"flags"}),
    ]
    guards = {"sig_data": "PERF_ATTR_SIZE_VER7", "config3": "PERF_ATTR_SIZE_VER8"}
    lines = []
    for cls, ctype, prefix, skip in structs:
        for name, *_ in cls._fields_:
            if name in skip:
                continue
            field = getattr(cls, name)
            member = f"{prefix}{name}"
            check = (
                f"_Static_assert(offsetof({ctype}, {member}) == {field.offset} && "
                f"sizeof((({ctype} *)0)->{member}) == {field.size}, "
                f'"{cls.__name__}.{name}");'
            )
            guard = guards.get(name) if ctype == "struct perf_event_attr" else None
            lines.append(f"#ifdef {guard}\n{check}\n#endif" if guard else check)
    lines.append('_Static_assert(offsetof(union bpf_attr, next_key) == 16, "next_key");')
    constants = [
        name
        for name in dir(bs)
        if name.startswith(("BPF_MAP_", "BPF_OBJ_", "BPF_RAW_", "BPF_ENABLE_", "BPF_STATS_"))
        or name.startswith(("PERF_TYPE_", "PERF_COUNT_", "PERF_FLAG_", "PERF_EVENT_IOC_"))
        or name in ("BPF_ANY", "BPF_NOEXIST", "BPF_EXIST", "BPF_OBJ_NAME_LEN")
    ]
    for name in constants:
        lines.append(f'_Static_assert({name} == {getattr(bs, name)}u, "{name}");')
    return lines


def test_struct_layouts_and_constants_match_uapi_headers(tmp_path: Path) -> None:
    gcc = require_tool("gcc")
    if not Path("/usr/include/linux/bpf.h").is_file():
        pytest.fail("/usr/include/linux/bpf.h missing (linux-libc-dev, pulled in by g++)")
    source = tmp_path / "layout.c"
    body = "\n".join(_layout_checks())
    source.write_text(
        f"#include <stddef.h>\n#include <linux/bpf.h>\n#include <linux/perf_event.h>\n{body}\n"
    )
    result = subprocess.run(
        [gcc, "-fsyntax-only", "-std=gnu11", str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert body.count("_Static_assert") > 100


# ------------------------------------------------------------------ maps


@pytest.fixture
def hash_map(require_bpf: None) -> Iterator[BpfMap]:
    fd = bs.create_map(bs.BPF_MAP_TYPE_HASH, 4, 8, 512, "test_hash")
    yield BpfMap.from_fd(fd)
    os.close(fd)


def _key(n: int) -> bytes:
    return struct.pack("=I", n)


def _value(n: int) -> bytes:
    return struct.pack("=Q", n)


def test_map_info_describes_the_map(hash_map: BpfMap) -> None:
    info = bs.map_info(hash_map.fd)
    assert (info.map_type, info.key_size, info.value_size, info.max_entries) == (1, 4, 8, 512)
    assert info.name == "test_hash" and info.id > 0
    assert hash_map.name == "test_hash" and not hash_map.percpu


def test_update_lookup_delete_and_flags(hash_map: BpfMap) -> None:
    assert hash_map.lookup(_key(1)) is None
    hash_map.update(_key(1), _value(10))
    assert hash_map.lookup(_key(1)) == _value(10)
    with pytest.raises(FileExistsError, match="BPF_MAP_UPDATE_ELEM.*test_hash"):
        hash_map.update(_key(1), _value(11), bs.BPF_NOEXIST)
    with pytest.raises(FileNotFoundError):
        hash_map.update(_key(2), _value(20), bs.BPF_EXIST)
    hash_map.update(_key(1), _value(12), bs.BPF_EXIST)
    assert hash_map.lookup(_key(1)) == _value(12)
    assert hash_map.delete(_key(1)) is True
    assert hash_map.delete(_key(1)) is False
    assert hash_map.items() == []


def test_wrong_sizes_are_value_errors(hash_map: BpfMap) -> None:
    with pytest.raises(ValueError, match="key of map 'test_hash' must be 4 bytes, got 8"):
        hash_map.lookup(_value(1))
    with pytest.raises(ValueError, match="must be 8 bytes"):
        hash_map.update(_key(1), _key(1))
    hash_map.update(_key(1), _value(1))
    with pytest.raises(ValueError, match="key of map 'test_hash' must be 4 bytes, got 8"):
        hash_map.delete_batch([_key(1), _value(1)])
    assert hash_map.lookup(_key(1)) == _value(1)  # nothing deleted


def test_full_map_raises_e2big(require_bpf: None) -> None:
    fd = bs.create_map(bs.BPF_MAP_TYPE_HASH, 4, 4, 2, "tiny")
    try:
        tiny = BpfMap.from_fd(fd)
        tiny.update(_key(1), _key(1))
        tiny.update(_key(2), _key(2))
        with pytest.raises(OSError) as raised:
            tiny.update(_key(3), _key(3))
        assert raised.value.errno == errno.E2BIG
    finally:
        os.close(fd)


def test_closed_fd_gives_a_clear_oserror(require_bpf: None) -> None:
    fd = bs.create_map(bs.BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    os.close(fd)
    with pytest.raises(OSError, match=rf"bpf\(BPF_OBJ_GET_INFO_BY_FD\) on map fd {fd}") as raised:
        bs.map_info(fd)
    assert raised.value.errno in (errno.EBADF, errno.EBADFD)  # the kernel says EBADFD here


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_items_and_batches_agree(hash_map: BpfMap, batch_size: int) -> None:
    expected = {_key(n): _value(n * n) for n in range(300)}
    for key, value in expected.items():
        hash_map.update(key, value)
    assert dict(hash_map.items()) == expected
    assert sorted(hash_map.keys()) == sorted(expected)
    assert hash_map._batches(bs.BPF_MAP_LOOKUP_BATCH, batch_size) is not None  # no fallback
    batch = hash_map.lookup_batch(batch_size=batch_size)
    assert len(batch) == 300 and dict(batch) == expected
    drained = hash_map.lookup_batch(delete=True, batch_size=batch_size)
    assert dict(drained) == expected
    assert hash_map.items() == [] and hash_map.lookup_batch() == []


def test_delete_batch_skips_absent_keys(hash_map: BpfMap) -> None:
    for n in range(10):
        hash_map.update(_key(n), _value(n))
    deleted = hash_map.delete_batch([_key(n) for n in (1, 100, 2, 3, 200, 4)])
    assert deleted == 4
    remaining = hash_map.keys()
    assert sorted(struct.unpack("=I", k)[0] for k in remaining) == [0, 5, 6, 7, 8, 9]


def test_array_batch_and_percpu_values(require_bpf: None) -> None:
    array_fd = bs.create_map(bs.BPF_MAP_TYPE_ARRAY, 4, 8, 5)
    percpu_fd = bs.create_map(bs.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 4, 2)
    try:
        array = BpfMap.from_fd(array_fd)
        array.update(_key(3), _value(33))
        assert dict(array.lookup_batch(batch_size=2)) == {
            _key(n): _value(33 if n == 3 else 0) for n in range(5)
        }
        percpu = BpfMap.from_fd(percpu_fd)
        cpus = bs.possible_cpu_count()
        assert percpu.percpu and percpu.value_buffer_size == 8 * cpus
        values = b"".join(struct.pack("=II", 100 + cpu, 0) for cpu in range(cpus))
        percpu.update(_key(1), values)
        assert percpu.lookup_percpu(_key(1)) == [struct.pack("=I", 100 + c) for c in range(cpus)]
        assert percpu.lookup_percpu(_key(7)) is None  # past the end of the array
    finally:
        os.close(array_fd)
        os.close(percpu_fd)


def test_update_batch_writes_many_entries(require_bpf: None) -> None:
    array_fd = bs.create_map(bs.BPF_MAP_TYPE_ARRAY, 4, 8, 5000)
    tiny_fd = bs.create_map(bs.BPF_MAP_TYPE_HASH, 4, 8, 3)
    try:
        array = BpfMap.from_fd(array_fd)
        keys = b"".join(_key(n) for n in range(100, 4100))
        array.update_batch(keys, b"".join(_value(n * 3) for n in range(100, 4100)))
        assert array.lookup(_key(99)) == _value(0)
        assert array.lookup(_key(100)) == _value(300) and array.lookup(_key(4099)) == _value(12297)
        assert dict(array.lookup_batch())[_key(2000)] == _value(6000)
        with pytest.raises(ValueError, match="not whole pairs"):
            array.update_batch(keys + b"x", b"")
        tiny = BpfMap.from_fd(tiny_fd)
        with pytest.raises(OSError, match="after 3 of 5 entries") as raised:
            tiny.update_batch(
                b"".join(_key(n) for n in range(5)), b"".join(_value(n) for n in range(5))
            )
        assert raised.value.errno == errno.E2BIG
        assert len(tiny.keys()) == 3
    finally:
        os.close(array_fd)
        os.close(tiny_fd)


def test_stack_trace_map_falls_back_from_batches(require_bpf: None) -> None:
    fd = bs.create_map(bs.BPF_MAP_TYPE_STACK_TRACE, 4, 8 * 127, 64)
    try:
        stacks = BpfMap.from_fd(fd)
        assert stacks._batches(bs.BPF_MAP_LOOKUP_BATCH, 8) is None  # no batch op: fallback
        assert stacks.lookup_batch() == [] and stacks.lookup_batch(delete=True) == []
    finally:
        os.close(fd)


# ------------------------------------------------------------------ perf events


def test_perf_event_argument_errors(require_bpf: None) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        bs.open_cpu_clock_event(0)
    with pytest.raises(ValueError, match="positive"):
        bs.open_cpu_clock_event(0, 0)
    limit = int(Path("/proc/sys/kernel/perf_event_max_sample_rate").read_text())
    with pytest.raises(OSError, match=r"perf_event_open\(cpu-clock, cpu 0.*max_sample_rate"):
        bs.open_cpu_clock_event(0, limit + 1)


def test_cpu_lists() -> None:
    online = bs.online_cpus()
    assert online and online == sorted(set(online))
    assert len(online) <= bs.possible_cpu_count()


# ------------------------------------------------------------------ ring buffer


class Producer:
    """The compiled PRODUCER, attached to sys_enter, emitting for this process only."""

    def __init__(self, compiled: CompiledProgram) -> None:
        self.compiled = compiled
        self.stats = compiled.map("stats")
        self.attachment = bs.raw_tracepoint_open("sys_enter", compiled.programs["on_sys_enter"])
        compiled.map("target").update(_key(0), _key(os.getpid()))

    def stat(self, index: int) -> int:
        value = self.stats.lookup(_key(index))
        assert value is not None
        return int(struct.unpack("=Q", value)[0])

    def close(self) -> None:
        os.close(self.attachment)
        self.compiled.close()


@pytest.fixture(scope="module")
def _producer_holder() -> Iterator[list[Producer]]:
    holder: list[Producer] = []
    yield holder
    for producer in holder:
        producer.close()


@pytest.fixture
def producer(require_bpf: None, _producer_holder: list[Producer]) -> Producer:
    if not _producer_holder:
        machine = platform.machine()
        compiled = compile_in_child(
            PRODUCER,
            [f"-DTRIGGER_NR={GETPPID[machine]}"],
            {"on_sys_enter": "raw_tracepoint"},
            env=find_kernel_headers().bcc_environment(),
        )
        _producer_holder.append(Producer(compiled))
    return _producer_holder[0]


@pytest.fixture
def ring(producer: Producer) -> Iterator[RingBuffer]:
    with producer.compiled.ring_buffer("events") as ring:
        ring.consume()  # whatever an earlier test left
        yield ring


def _trigger(n: int) -> None:
    for _ in range(n):
        os.getppid()


def _check_record(record: bytes, pid: int) -> int:
    """The record's sequence number, after checking its payload against its kind."""
    seq, record_pid, tag = struct.unpack_from("=III", record)
    assert record_pid == pid
    if seq % 3 == 0:
        assert len(record) == 12 and tag == 0xA0
    else:
        assert seq % 3 == 1 and len(record) == 20 and tag == 0xB1
        assert struct.unpack_from("=II", record, 12) == ((seq * 7) & 0xFFFFFFFF, ~seq & 0xFFFFFFFF)
    return int(seq)


def test_records_arrive_in_order_across_many_wraps(producer: Producer, ring: RingBuffer) -> None:
    first, dropped = producer.stat(0), producer.stat(1)
    records: list[bytes] = []
    for _ in range(50):
        _trigger(40)  # about 1 KiB of records per batch into a 4 KiB ring
        records += ring.consume()
    seqs = [_check_record(r, os.getpid()) for r in records]
    assert producer.stat(1) == dropped, "records were dropped while the ring had room"
    assert seqs == [s for s in range(first, first + 2000) if s % 3 != 2]
    assert ring.pending_bytes() == 0
    discarded_bytes = (2000 - len(records)) * record_span(12)
    written = sum(record_span(len(r)) for r in records) + discarded_bytes
    assert ring.size == 4096 and written > 10 * ring.size  # wrapped at least 10 times


def test_a_full_ring_drops_then_recovers(producer: Producer, ring: RingBuffer) -> None:
    first, dropped, discarded = producer.stat(0), producer.stat(1), producer.stat(2)
    _trigger(400)  # ~10 KiB of records into 4 KiB, nobody consuming
    records = ring.consume()
    seqs = [_check_record(r, os.getpid()) for r in records]
    new_drops = producer.stat(1) - dropped
    assert new_drops > 0
    assert seqs == sorted(seqs) and all(first <= s < first + 400 for s in seqs)
    assert len(seqs) + new_drops + (producer.stat(2) - discarded) == 400
    assert sum(record_span(len(r)) for r in records) <= ring.size
    # Consuming freed the space: the next records all fit again.
    before = producer.stat(1)
    _trigger(30)
    assert len(ring.consume()) == 20 and producer.stat(1) == before


def test_consume_respects_max_records(producer: Producer, ring: RingBuffer) -> None:
    _trigger(9)  # 6 records, 3 discarded
    part = ring.consume(max_records=4)
    rest = ring.consume()
    assert len(part) == 4 and len(rest) == 2
    seqs = [_check_record(r, os.getpid()) for r in part + rest]
    assert seqs == sorted(set(seqs))


def test_poll_waits_for_the_first_record(producer: Producer, ring: RingBuffer) -> None:
    assert ring.poll(timeout_ms=0) == []
    assert ring.poll(timeout_ms=50) == []  # nothing comes: returns empty after the wait
    _trigger(3)
    assert len(ring.poll(timeout_ms=30_000)) == 2  # already there: no wait
    started = threading.Event()

    def trigger_soon() -> None:
        started.wait(30)
        time.sleep(0.2)  # most likely after poll() is asleep in epoll_wait
        _trigger(3)  # at least two real records

    thread = threading.Thread(target=trigger_soon)
    thread.start()
    try:
        started.set()
        records = ring.poll(timeout_ms=30_000)
        assert records, "poll returned without a record within 30 s"
    finally:
        thread.join(30)
    assert ring.fileno() >= 0


def test_ring_buffer_rejects_other_maps_and_closed_use(
    hash_map: BpfMap, producer: Producer
) -> None:
    with pytest.raises(ValueError, match="not a ring buffer"):
        RingBuffer(hash_map.fd)
    ring = producer.compiled.ring_buffer("events")
    ring.close()
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.consume()


def test_prog_info_counts_runs_while_stats_are_on(producer: Producer) -> None:
    prog_fd = producer.compiled.programs["on_sys_enter"]
    stats_fd = bs.enable_run_time_stats()
    try:
        before = bs.prog_info(prog_fd)
        _trigger(50)
        after = bs.prog_info(prog_fd)
    finally:
        os.close(stats_fd)
    assert after.name == "on_sys_enter" and after.prog_type == 17 and after.id == before.id
    assert after.run_cnt - before.run_cnt >= 50  # sys_enter also fires for every other syscall
    assert after.run_time_ns > before.run_time_ns


def test_raw_tracepoint_errors_name_the_tracepoint(producer: Producer) -> None:
    with pytest.raises(OSError, match="raw tracepoint 'no_such_tracepoint'") as raised:
        bs.raw_tracepoint_open("no_such_tracepoint", producer.compiled.programs["on_sys_enter"])
    assert raised.value.errno == errno.ENOENT


def test_attaching_a_non_perf_program_to_a_perf_event_fails(producer: Producer) -> None:
    perf_fd = bs.open_cpu_clock_event(bs.online_cpus()[0], 10)
    try:
        with pytest.raises(OSError, match="PERF_EVENT_IOC_SET_BPF") as raised:
            bs.attach_perf_event(perf_fd, producer.compiled.programs["on_sys_enter"])
        assert raised.value.errno == errno.EINVAL
    finally:
        os.close(perf_fd)
