"""A BPF map as bytes in, bytes out, over its file descriptor (no bcc).

Keys and values are raw bytes of the map's key and value size; the caller packs and
unpacks them (struct / ctypes), so this module knows no program's layout. Per-CPU
maps return one value per possible CPU.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

from agent.sampler.bpf_syscalls import (
    _BATCH_UNSUPPORTED,
    BPF_ANY,
    BPF_MAP_DELETE_BATCH,
    BPF_MAP_DELETE_ELEM,
    BPF_MAP_GET_NEXT_KEY,
    BPF_MAP_LOOKUP_AND_DELETE_BATCH,
    BPF_MAP_LOOKUP_BATCH,
    BPF_MAP_LOOKUP_ELEM,
    BPF_MAP_UPDATE_BATCH,
    BPF_MAP_UPDATE_ELEM,
    PERCPU_MAP_TYPES,
    _address,
    _c_buffer,
    _MapBatchAttr,
    _MapElemAttr,
    bpf,
    map_info,
    possible_cpu_count,
)

DEFAULT_BATCH = 256


class BpfMap:
    """Lookup, update, delete and iteration on one map. Does not own (close) the fd."""

    def __init__(
        self,
        fd: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        map_type: int,
        name: str = "",
    ) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.map_type = map_type
        self.name = name or f"fd {fd}"
        self.percpu = map_type in PERCPU_MAP_TYPES
        # A per-CPU lookup fills one 8-byte-aligned slot per possible CPU.
        self._cpus = possible_cpu_count() if self.percpu else 1
        self._slot = (value_size + 7) // 8 * 8 if self.percpu else value_size
        self.value_buffer_size = self._slot * self._cpus

    @classmethod
    def from_fd(cls, fd: int, name: str = "") -> BpfMap:
        """A BpfMap described by the kernel (BPF_OBJ_GET_INFO_BY_FD)."""
        info = map_info(fd)
        return cls(
            fd, info.key_size, info.value_size, info.max_entries, info.map_type, name or info.name
        )

    def __repr__(self) -> str:
        return f"BpfMap({self.name!r}, fd={self.fd}, type={self.map_type})"

    def _what(self) -> str:
        return f"map {self.name!r}"

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        return _c_buffer(key, self.key_size, f"key of {self._what()}")

    def _elem(
        self, cmd: int, key: ctypes.Array[ctypes.c_char] | None, value: int = 0, flags: int = 0
    ) -> None:
        attr = _MapElemAttr(map_fd=self.fd, key=_address(key), value=value, flags=flags)
        bpf(cmd, attr, self._what())

    # ------------------------------------------------------------ single elements

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None when the key is absent. Per-CPU maps: every CPU's slot
        concatenated (see `lookup_percpu`)."""
        value = ctypes.create_string_buffer(self.value_buffer_size)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, self._key(key), ctypes.addressof(value))
        except FileNotFoundError:
            return None
        return value.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU, or None when the key is absent."""
        raw = self.lookup(key)
        if raw is None:
            return None
        return [raw[i * self._slot : i * self._slot + self.value_size] for i in range(self._cpus)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Insert or replace. BPF_NOEXIST on a present key raises FileExistsError,
        BPF_EXIST on an absent key FileNotFoundError, a full map OSError(E2BIG)."""
        size = self.value_buffer_size
        buffer = _c_buffer(value, size, f"value of {self._what()}")
        self._elem(BPF_MAP_UPDATE_ELEM, self._key(key), ctypes.addressof(buffer), flags)

    def delete(self, key: bytes) -> bool:
        """Delete one key; False when it was not there."""
        try:
            self._elem(BPF_MAP_DELETE_ELEM, self._key(key))
        except FileNotFoundError:
            return False
        return True

    # ------------------------------------------------------------ iteration

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after `key` (the first key for None); None at the end."""
        out = ctypes.create_string_buffer(self.key_size)
        current = None if key is None else self._key(key)
        try:
            self._elem(BPF_MAP_GET_NEXT_KEY, current, ctypes.addressof(out))
        except FileNotFoundError:
            return None
        return out.raw

    def keys(self) -> list[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY. If BPF code deletes the key we stand on,
        the kernel restarts from the first key; a repeated key ends the walk."""
        keys: list[bytes] = []
        seen: set[bytes] = set()
        key = self.next_key(None)
        while key is not None and key not in seen and len(keys) < self.max_entries:
            keys.append(key)
            seen.add(key)
            key = self.next_key(key)
        return keys

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value); keys deleted between the walk and the lookup are skipped."""
        found = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                found.append((key, value))
        return found

    # ------------------------------------------------------------ batches

    def lookup_batch(
        self, *, delete: bool = False, batch_size: int = DEFAULT_BATCH
    ) -> list[tuple[bytes, bytes]]:
        """Every (key, value) in few syscalls (BPF_MAP_LOOKUP[_AND_DELETE]_BATCH);
        `delete` also removes what was returned. Falls back to `items()` (+ deletes)
        on map types without batch support (stack-trace maps, older kernels)."""
        cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
        found = self._batches(cmd, max(1, batch_size))
        if found is not None:
            return found
        found = self.items()
        if delete:
            self.delete_batch([key for key, _ in found])
        return found

    def _batches(self, cmd: int, batch_size: int) -> list[tuple[bytes, bytes]] | None:
        """Run batch lookups to the end; None if the kernel has no such op for this map."""
        token_size = max(self.key_size, 8)  # hash maps: a u32 bucket; others: a key
        tokens = (ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size))
        found: list[tuple[bytes, bytes]] = []
        started = False
        while True:
            keys = ctypes.create_string_buffer(self.key_size * batch_size)
            values = ctypes.create_string_buffer(self.value_buffer_size * batch_size)
            attr = _MapBatchAttr(
                in_batch=ctypes.addressof(tokens[0]) if started else 0,
                out_batch=ctypes.addressof(tokens[1]),
                keys=ctypes.addressof(keys),
                values=ctypes.addressof(values),
                count=batch_size,
                map_fd=self.fd,
            )
            err = self._batch_call(cmd, attr)
            if err in _BATCH_UNSUPPORTED and not started and not found:
                return None
            if err == errno.ENOSPC and attr.count == 0:
                batch_size *= 2  # one hash bucket holds more than a batch: retry bigger
                continue
            found.extend(self._split(keys.raw, values.raw, attr.count))
            if err == errno.ENOENT:
                return found
            if err:
                raise OSError(err, f"batch lookup on {self._what()}: {os.strerror(err)}")
            ctypes.memmove(tokens[0], tokens[1], token_size)
            started = True

    def _batch_call(self, cmd: int, attr: _MapBatchAttr) -> int:
        """The errno of one batch call (0 on success); attr.count says how many."""
        try:
            bpf(cmd, attr, self._what())
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _split(self, keys: bytes, values: bytes, count: int) -> list[tuple[bytes, bytes]]:
        ks, vs = self.key_size, self.value_buffer_size
        return [(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]) for i in range(count)]

    def delete_batch(self, keys: Iterable[bytes]) -> int:
        """Delete the keys (absent ones are skipped); returns how many were deleted."""
        pending = list(keys)
        wrong = set(map(len, pending)) - {self.key_size}
        if wrong:
            size = min(wrong)
            raise ValueError(f"key of {self._what()} must be {self.key_size} bytes, got {size}")
        deleted = 0
        while pending:
            buffer = ctypes.create_string_buffer(b"".join(pending), self.key_size * len(pending))
            attr = _MapBatchAttr(keys=ctypes.addressof(buffer), count=len(pending), map_fd=self.fd)
            err = self._batch_call(BPF_MAP_DELETE_BATCH, attr)
            if err in _BATCH_UNSUPPORTED:  # attr.count is left as we set it: useless
                return deleted + sum(self.delete(key) for key in pending)
            deleted += attr.count
            if not err:
                return deleted
            if err != errno.ENOENT:
                raise OSError(err, f"batch delete on {self._what()}: {os.strerror(err)}")
            pending = pending[attr.count + 1 :]  # skip the absent key, go on after it
        return deleted

    def update_batch(self, keys: bytes, values: bytes, flags: int = BPF_ANY) -> None:
        """Write many entries in one syscall (BPF_MAP_UPDATE_BATCH): `keys` and `values`
        are the packed keys and values back to back. Falls back to one update per key
        on map types without the op. On error nothing after the failing entry is
        written, and the message says how many were."""
        count, rest = divmod(len(keys), self.key_size)
        if rest or len(values) != count * self.value_buffer_size:
            raise ValueError(
                f"update_batch on {self._what()}: {len(keys)} key bytes and {len(values)} "
                f"value bytes are not whole pairs of {self.key_size} + {self.value_buffer_size}"
            )
        if count == 0:
            return
        key_buffer = ctypes.create_string_buffer(keys, len(keys))
        value_buffer = ctypes.create_string_buffer(values, len(values))
        attr = _MapBatchAttr(
            keys=ctypes.addressof(key_buffer),
            values=ctypes.addressof(value_buffer),
            count=count,
            map_fd=self.fd,
            elem_flags=flags,
        )
        err = self._batch_call(BPF_MAP_UPDATE_BATCH, attr)
        if not err:
            return
        if err in _BATCH_UNSUPPORTED:  # writing again is harmless: updates are idempotent
            ks, vs = self.key_size, self.value_buffer_size
            for i in range(count):
                self.update(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs], flags)
            return
        raise OSError(
            err,
            f"batch update on {self._what()}: {os.strerror(err)} "
            f"after {attr.count} of {count} entries",
        )
