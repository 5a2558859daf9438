"""SymbolStore: the symbol indexes (SymCaches) on disk, so each build id is indexed once
and survives restarts.

Layout under the store's directory, one entry per binary:
    <name>.symcache   the SymCache (opened by mmap: nothing big lives in Python)
    <name>.json       what the lookup needs beside it (the indexed file's load address)
    <name>.failed     a recent indexing failure (reason), honoured for `failure_ttl`
    <name>.lock       held (flock) while one thread of one process builds the entry
<name> is the build id, or a digest of the file identity for files without one.
The store is bounded by total bytes: least recently used entries go first (use
refreshes an entry's mtime).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIXES = (".symcache", ".json", ".failed", ".lock")
_BUILD_ID = re.compile(r"^[0-9a-f]{2,128}$")
STALE_TEMP_SECONDS = 3600.0  # a temp file this old belongs to a build that died


@dataclass(frozen=True)
class CachedIndex:
    path: Path
    load_address: int


def entry_name(key: str) -> str:
    """A safe file name for a binary key ("build:<hex>" or a file identity)."""
    kind, _, value = key.partition(":")
    if kind == "build" and _BUILD_ID.match(value):
        return value
    return "file-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class SymbolStore:
    """A directory of SymCaches, bounded to max_bytes. Thread- and process-safe."""

    def __init__(self, directory: Path, max_bytes: int, failure_ttl: float = 3600.0) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.failure_ttl = failure_ttl
        self._thread_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str, suffix: str = ".symcache") -> Path:
        return self.directory / (entry_name(key) + suffix)

    def lookup(self, key: str) -> CachedIndex | None:
        """The stored index of key, or None; refreshes its place in the LRU order."""
        path = self.path_of(key)
        try:
            meta = json.loads(self.path_of(key, ".json").read_text())
            if meta.get("version") != FORMAT_VERSION:
                return None
            load_address = int(meta["load_address"])
            os.utime(path)  # raises when the symcache itself is missing
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return CachedIndex(path, load_address)

    def failure(self, key: str) -> str | None:
        """The reason of a failure recorded less than failure_ttl ago, else None."""
        marker = self.path_of(key, ".failed")
        try:
            if time.time() - marker.stat().st_mtime > self.failure_ttl:
                return None
            return marker.read_text().strip() or "failed"
        except OSError:
            return None

    def mark_failed(self, key: str, reason: str) -> None:
        with contextlib.suppress(OSError):
            self.path_of(key, ".failed").write_text(reason + "\n")

    def temp_path(self, key: str) -> Path:
        """A fresh path in the store's directory for a SymCache being built."""
        unique = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        return self.directory / f"{entry_name(key)}.tmp-{unique}"

    def commit(self, key: str, built: Path, load_address: int) -> CachedIndex:
        """Move a built SymCache into place (metadata first), then evict to the bound."""
        meta = {"version": FORMAT_VERSION, "load_address": load_address, "key": key}
        meta_path = self.path_of(key, ".json")
        meta_tmp = meta_path.with_suffix(f".json.tmp-{os.getpid()}")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, meta_path)
        os.replace(built, self.path_of(key))
        with contextlib.suppress(OSError):
            self.path_of(key, ".failed").unlink()
        self.evict(committing=entry_name(key))
        return CachedIndex(self.path_of(key), load_address)

    def discard(self, key: str) -> None:
        """Forget an entry (e.g. a SymCache that no longer opens)."""
        for suffix in (".symcache", ".json"):
            with contextlib.suppress(OSError):
                self.path_of(key, suffix).unlink()

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold the build lock of key: one builder per entry, across threads and processes."""
        name = entry_name(key)
        with self._guard:
            thread_lock = self._thread_locks.setdefault(name, threading.Lock())
        with thread_lock:
            fd = self._lock_file(key)
            try:
                yield
            finally:
                # Unlinked while held: a waiter that opened it sees another inode and retries.
                with contextlib.suppress(OSError):
                    self.path_of(key, ".lock").unlink()
                os.close(fd)  # releases the flock

    def _lock_file(self, key: str) -> int:
        path = self.path_of(key, ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # evict() may have unlinked the file we waited on: lock the current one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except OSError:
                pass
            os.close(fd)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries().values())

    def evict(self, committing: str = "") -> int:
        """Remove least recently used entries until the store fits; returns bytes freed.

        An entry being built elsewhere is skipped; `committing` names the one the caller
        holds the lock of (it goes too when it alone exceeds the bound).
        """
        entries = self._entries()
        total = sum(size for _, size, _ in entries.values())
        freed = 0
        for name, (_, size, paths) in sorted(entries.items(), key=lambda item: item[1][0]):
            if total - freed <= self.max_bytes:
                break
            if self._remove_entry(name, paths, locked_by_caller=name == committing):
                freed += size
        return freed

    def _remove_entry(self, name: str, paths: list[Path], locked_by_caller: bool) -> bool:
        """Delete an entry unless someone else is building it (its lock is held)."""
        lock_path = self.directory / f"{name}.lock"
        try:
            fd = -1 if locked_by_caller else os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            fd = -1
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        return False
                    raise
            for path in paths:
                with contextlib.suppress(OSError):
                    path.unlink()  # a SymCache mapped by a live index stays readable
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def _entries(self) -> dict[str, tuple[float, int, list[Path]]]:
        """name -> (last use, bytes, files); stale temp files are removed on the way."""
        entries: dict[str, tuple[float, int, list[Path]]] = {}
        now = time.time()
        try:
            scan = list(os.scandir(self.directory))
        except OSError:
            return entries
        for item in scan:
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            expired_failure = item.name.endswith(".failed") and (
                now - st.st_mtime > self.failure_ttl
            )
            if ".tmp-" in item.name or expired_failure:
                if expired_failure or now - st.st_mtime > STALE_TEMP_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(item.path)
                continue
            name, dot, suffix = item.name.rpartition(".")
            if not dot or "." + suffix not in SUFFIXES:
                continue
            used, size, paths = entries.get(name, (0.0, 0, []))
            paths.append(Path(item.path))
            entries[name] = (max(used, st.st_mtime), size + st.st_size, paths)
        return entries
