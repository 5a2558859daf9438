"""Consumer of a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF) over mmap, without bcc.

The same protocol as libbpf's ringbuf.c. The map's fd maps as:
  offset 0, one page, read-write:  the consumer page; consumer_pos (u64) at its start;
  offset one page, read-only:      the producer page (producer_pos, u64), followed by
                                   the data area mapped twice in a row, so a record
                                   that wraps past the end reads as contiguous bytes.
Positions only grow; a position's place in the data area is `pos & (size - 1)`.
Each record starts with an 8-byte header: u32 length (bit 31 BUSY: reserved, not
committed yet; bit 30 DISCARD: skip it) and u32 page offset; the record then takes
`round_up(length + 8, 8)` bytes. The consumer reads records from consumer_pos up to
producer_pos, stops at the first BUSY one, and publishes the new consumer_pos,
which frees the space for the kernel. epoll on the map fd reports EPOLLIN while
data is available.

Ordering: producer_pos and each header are read with acquire semantics and
consumer_pos written with release semantics. On x86-64 (TSO) plain aligned loads
and stores have them; elsewhere the loads and stores go through libatomic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import select
from collections.abc import Callable
from types import TracebackType

from agent.sampler.bpf_syscalls import BPF_MAP_TYPE_RINGBUF, map_info

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
_LENGTH_MASK = DISCARD_BIT - 1

_PROT_READ, _PROT_WRITE, _MAP_SHARED = 0x1, 0x2, 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def record_span(length_word: int) -> int:
    """Bytes a record takes in the ring: header + payload, rounded up to 8."""
    return ((length_word & _LENGTH_MASK) + HEADER_SIZE + 7) // 8 * 8


def _plain_load_u64(address: int) -> int:
    return int(ctypes.c_uint64.from_address(address).value)


def _plain_load_u32(address: int) -> int:
    return int(ctypes.c_uint32.from_address(address).value)


def _plain_store_u64(address: int, value: int) -> None:
    ctypes.c_uint64.from_address(address).value = value


def _atomic_accessors() -> tuple[
    Callable[[int], int], Callable[[int], int], Callable[[int, int], None]
]:
    """Acquire loads / release store: plain on x86 (TSO), libatomic elsewhere."""
    if platform.machine() in ("x86_64", "i686", "i386"):
        return _plain_load_u64, _plain_load_u32, _plain_store_u64
    path = ctypes.util.find_library("atomic")
    if path is None:
        raise OSError(errno.ENOSYS, f"ring buffer on {platform.machine()} needs libatomic")
    lib = ctypes.CDLL(path)
    acquire, release = 2, 3  # __ATOMIC_ACQUIRE, __ATOMIC_RELEASE
    load8, load4, store8 = lib.__atomic_load_8, lib.__atomic_load_4, lib.__atomic_store_8
    load8.restype, load8.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_int]
    load4.restype, load4.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int]
    store8.restype = None
    store8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    return (
        lambda address: int(load8(address, acquire)),
        lambda address: int(load4(address, acquire)),
        lambda address, value: store8(address, value, release),
    )


_load_acquire_u64, _load_acquire_u32, _store_release_u64 = _atomic_accessors()


def _map(length: int, prot: int, fd: int, offset: int, what: str) -> int:
    address = _libc.mmap(None, length, prot, _MAP_SHARED, fd, offset)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of ring buffer {what} ({length} bytes): {os.strerror(err)}")
    return int(address)


class RingBuffer:
    """Reads the records of one ring buffer map. Does not own (close) the map fd."""

    def __init__(self, map_fd: int, name: str = "") -> None:
        info = map_info(map_fd)
        self.name = name or info.name
        if info.map_type != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"map {self.name!r} is of type {info.map_type}, not a ring buffer")
        self.map_fd = map_fd
        self.size = info.max_entries  # data bytes: a power of 2, a multiple of the page
        self._mask = self.size - 1
        self._page = mmap.PAGESIZE
        self._consumer = 0
        self._producer = 0
        self._epoll: select.epoll | None = None
        try:
            self._consumer = _map(
                self._page, _PROT_READ | _PROT_WRITE, map_fd, 0, f"{self.name!r} consumer page"
            )
            self._producer = _map(
                self._page + 2 * self.size, _PROT_READ, map_fd, self._page, f"{self.name!r} data"
            )
            self._epoll = select.epoll()
            self._epoll.register(map_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self._data = self._producer + self._page

    def fileno(self) -> int:
        """An epoll fd that is readable while records are waiting (for select/poll loops)."""
        return self._require_open().fileno()

    def pending_bytes(self) -> int:
        """Bytes the producer has written and we have not consumed (headers included)."""
        self._require_open()
        return _load_acquire_u64(self._producer) - _load_acquire_u64(self._consumer)

    def consume(self, max_records: int | None = None) -> list[bytes]:
        """Every committed record available now (up to `max_records`), oldest first.

        Stops at a record still being written (BUSY); discarded records are skipped.
        Consumed space is handed back to the kernel record by record."""
        self._require_open()
        records: list[bytes] = []
        consumer_pos = _load_acquire_u64(self._consumer)
        while True:
            producer_pos = _load_acquire_u64(self._producer)
            progressed = False
            while consumer_pos < producer_pos:
                header = self._data + (consumer_pos & self._mask)
                length_word = _load_acquire_u32(header)
                if length_word & BUSY_BIT:
                    return records
                progressed = True
                consumer_pos += record_span(length_word)
                if not length_word & DISCARD_BIT:
                    records.append(ctypes.string_at(header + HEADER_SIZE, length_word))
                _store_release_u64(self._consumer, consumer_pos)
                if max_records is not None and len(records) >= max_records:
                    return records
            if not progressed:
                return records

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> list[bytes]:
        """Records available now; if none, waits up to `timeout_ms` (-1: forever)
        for the first one, then returns everything available."""
        epoll = self._require_open()
        records = self.consume(max_records)
        if records or timeout_ms == 0:
            return records
        timeout = -1.0 if timeout_ms < 0 else timeout_ms / 1000
        ready = epoll.poll(timeout)  # PEP 475: retried on EINTR
        return self.consume(max_records) if ready else []

    def _require_open(self) -> select.epoll:
        if self._epoll is None:
            raise ValueError(f"ring buffer {self.name!r} is closed")
        return self._epoll

    def close(self) -> None:
        """Unmap and stop polling. Idempotent."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._producer:
            _libc.munmap(self._producer, self._page + 2 * self.size)
            self._producer = 0
        if self._consumer:
            _libc.munmap(self._consumer, self._page)
            self._consumer = 0

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
