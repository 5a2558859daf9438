"""A disk spool of encoded requests: bounded in bytes, ordered, surviving restarts.

One file per request, named by its sequence number (`<seq>.<protocol>.req`), so a
directory listing gives the delivery order back after a restart. A file is
MAGIC + crc32(payload) + payload, written to a temporary name, fsynced, renamed, and
the directory fsynced (agent/util/atomic_file.py) before append() returns: once appended, a
request survives kill -9 and power loss. A crash mid-write leaves a `.tmp` that is
cleaned up at start; a file that fails its checksum is dropped and counted, never sent.
Deletes are not fsynced (they follow every delivery): after a power loss, files
deleted in the last moments may come back and be sent again.

Not thread-safe: RemoteSink calls it under its lock (reads happen outside, and a
read of a file evicted meanwhile reports it as gone).
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from agent.util.atomic_file import write_atomically

log = logging.getLogger(__name__)
MAGIC = b"STROBE1\n"
HEADER_BYTES = len(MAGIC) + 4
SUFFIX = ".req"


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    path: Path
    size: int  # bytes on disk, header included


class SpoolError(Exception):
    """A spool file that cannot be delivered (missing, corrupt); already removed."""


class Spool:
    def __init__(self, directory: Path, max_bytes: int, protocol: str) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.protocol = protocol
        self.entries: deque[SpoolEntry] = deque()
        self.bytes = 0
        self.discarded_at_start = 0  # files of another protocol or unreadable names
        directory.mkdir(parents=True, exist_ok=True)
        self._load()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def last_seq(self) -> int:
        return self.entries[-1].seq if self.entries else 0

    def append(
        self, seq: int, payload: bytes, keep: int = -1
    ) -> tuple[SpoolEntry | None, list[SpoolEntry]]:
        """Store `payload` durably as entry `seq`, evicting the oldest (but `keep`) to fit.

        Returns (the entry, evicted entries); no entry when the payload alone exceeds
        the bound or cannot be written (then it is not on disk at all).
        """
        size = HEADER_BYTES + len(payload)
        if size > self.max_bytes:
            return None, []
        evicted = self._evict(self.max_bytes - size, keep)
        path = self.directory / f"{seq:016d}.{self.protocol}{SUFFIX}"
        try:
            write_atomically(
                path,
                MAGIC + zlib.crc32(payload).to_bytes(4, "big") + payload,
                temporary=path.with_name(f".{path.name}.tmp"),  # what start-up cleans up
            )
        except OSError as exc:
            log.warning("spool: cannot write %s: %s", path, exc.strerror)
            return None, evicted
        entry = SpoolEntry(seq, path, size)
        self.entries.append(entry)
        if len(self.entries) > 1 and self.entries[-2].seq > seq:  # spilled at close: older
            self.entries = deque(sorted(self.entries, key=lambda e: e.seq))
        self.bytes += size
        return entry, evicted

    def remove(self, entry: SpoolEntry) -> None:
        """Forget `entry` and delete its file (delivered, or given up on)."""
        try:
            self.entries.remove(entry)
            self.bytes -= entry.size
        except ValueError:  # already evicted
            pass
        entry.path.unlink(missing_ok=True)

    def _evict(self, room: int, keep: int) -> list[SpoolEntry]:
        """Delete the oldest files (but `keep`) until `room` bytes remain: O(evicted)."""
        evicted: list[SpoolEntry] = []
        kept: list[SpoolEntry] = []
        while self.entries and self.bytes > room:
            entry = self.entries.popleft()
            if entry.seq == keep:
                kept.append(entry)
                continue
            self.bytes -= entry.size
            entry.path.unlink(missing_ok=True)
            evicted.append(entry)
        self.entries.extendleft(reversed(kept))
        return evicted

    def _load(self) -> None:
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            seq_text, _, rest = path.name.partition(".")
            if not seq_text.isdigit() or rest != f"{self.protocol}{SUFFIX}":
                log.warning("spool: discarding %s (not a %s request)", path, self.protocol)
                path.unlink(missing_ok=True)
                self.discarded_at_start += 1
                continue
            try:
                found.append(SpoolEntry(int(seq_text), path, path.stat().st_size))
            except OSError:
                continue
        for entry in sorted(found, key=lambda e: e.seq):
            self.entries.append(entry)
            self.bytes += entry.size
        if self.bytes > self.max_bytes:
            self.discarded_at_start += len(self._evict(self.max_bytes, keep=-1))


def read_entry(entry: SpoolEntry) -> bytes:
    """The payload of a spool file; SpoolError (file removed) when missing or corrupt."""
    try:
        data = entry.path.read_bytes()
    except FileNotFoundError:
        raise SpoolError(f"{entry.path} vanished (evicted)") from None
    except OSError as exc:
        raise SpoolError(f"{entry.path}: {exc.strerror}") from None
    payload = data[HEADER_BYTES:]
    intact = data[: len(MAGIC)] == MAGIC and data[len(MAGIC) : HEADER_BYTES] == zlib.crc32(
        payload
    ).to_bytes(4, "big")
    if not intact:
        entry.path.unlink(missing_ok=True)
        raise SpoolError(f"{entry.path} is corrupt")
    return payload
