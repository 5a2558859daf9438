"""JIT frames from perf map files: "START SIZE name" per line, START and SIZE in hex.

Node (--perf-basic-prof), Java (perf-map-agent), Python 3.12+ (-X perf) and other
JITs write /tmp/perf-<pid>.map for code they generate in anonymous executable
memory. The file is in the process's own /tmp (its mount namespace) and named by its
pid in its own pid namespace, so it is read as /proc/<pid>/root/tmp/perf-<nspid>.map.
Files only grow while the JIT runs: new lines are read incrementally when the size
or mtime changed (checked at most every `recheck_seconds`); a later line for the same
start address replaces the earlier one. Sizes, entries and processes are bounded.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from agent.model import Mapping, ProcessInfo

PROC = Path("/proc")
MAX_FILE_BYTES = 64 << 20  # a runaway file is read up to here
MAX_ENTRIES = 1 << 20
MAX_LINE = 4096
MISS_RECHECK = 0.05  # seconds between re-reads driven by unknown addresses


def is_jit_candidate(mapping: Mapping) -> bool:
    """Executable memory that no file backs: where JITs put generated code."""
    if "x" not in mapping.perms:
        return False
    path = mapping.path
    return path == "" or path.startswith("[anon") or path.startswith("/memfd:")


def status_fields(pid: int, proc: Path = PROC) -> dict[str, str]:
    """/proc/PID/status as name -> value text ({} when the process is gone)."""
    try:
        text = (proc / str(pid) / "status").read_text(errors="replace")
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def perf_map_location(pid: int, proc: Path = PROC) -> tuple[Path, frozenset[int]]:
    """(path of pid's perf map as we can open it, uids allowed to own it).

    With the process gone, its mount namespace is too: the host's /tmp is the best guess,
    and no owner is known (empty set: any).
    """
    fields = status_fields(pid, proc)
    if not fields:
        return Path(f"/tmp/perf-{pid}.map"), frozenset()
    nspid = fields.get("NSpid", str(pid)).split()[-1]  # innermost pid namespace
    uids = frozenset(int(u) for u in fields.get("Uid", "").split()[:2] if u.isdigit())
    return proc / str(pid) / "root" / "tmp" / f"perf-{nspid}.map", uids | {0}


def parse_line(line: bytes) -> tuple[int, int, str] | None:
    parts = line.strip().split(None, 2)
    if len(parts) != 3:
        return None
    try:
        start, size = int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        return None
    if size <= 0 or start <= 0:
        return None
    return start, size, parts[2].decode("utf-8", "replace")


@dataclass
class PerfMap:
    """One process's perf map, read incrementally."""

    path: Path
    owners: frozenset[int]  # empty: not checked
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # dev, inode, size, mtime_ns
    offset: int = 0  # bytes consumed (complete lines)
    entries: dict[int, tuple[int, str]] = field(default_factory=dict)  # start -> (end, name)
    starts: list[int] = field(default_factory=list)
    checked_at: float = -1e9

    def lookup(self, address: int) -> str | None:
        index = bisect.bisect_right(self.starts, address) - 1
        if index < 0:
            return None
        end, name = self.entries[self.starts[index]]
        return name if address < end else None

    def refresh(self) -> None:
        """Read what was appended since the last refresh (all of it if the file changed)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (self.owners and st.st_uid not in self.owners):
                return  # a FIFO, device or someone else's file: never read it
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if identity == self.identity:
                return
            if identity[:2] != self.identity[:2] or st.st_size < self.offset:
                self.entries.clear()
                self.offset = 0
            self.identity = identity
            f.seek(self.offset)
            data = f.read(max(0, min(st.st_size, MAX_FILE_BYTES) - self.offset))
        self._add_lines(data)

    def _add_lines(self, data: bytes) -> None:
        complete = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        for line in data[:complete].splitlines():
            parsed = parse_line(line[:MAX_LINE])
            if parsed is None or len(self.entries) >= MAX_ENTRIES:
                continue
            start, size, name = parsed
            self.entries[start] = (start + size, name)
        self.offset += complete
        self.starts = sorted(self.entries)


class PerfMaps:
    """Perf maps of up to max_processes processes, keyed by pid + start time."""

    def __init__(
        self, proc: Path = PROC, recheck_seconds: float = 1.0, max_processes: int = 64
    ) -> None:
        self._proc = proc
        self._recheck_seconds = recheck_seconds
        self._max_processes = max_processes
        self._maps: OrderedDict[tuple[int, int], PerfMap] = OrderedDict()
        self._lock = threading.Lock()

    def locate(self, process: ProcessInfo) -> PerfMap:
        """The process's perf map entry; its location is resolved once, while it lives."""
        key = (process.pid, process.start_time)
        with self._lock:
            perf_map = self._maps.get(key)
            if perf_map is None:
                path, owners = perf_map_location(process.pid, self._proc)
                perf_map = self._maps[key] = PerfMap(path, owners)
                while len(self._maps) > self._max_processes:
                    self._maps.popitem(last=False)
            self._maps.move_to_end(key)
            return perf_map

    def preload(self, process: ProcessInfo) -> None:
        """Locate and read the process's perf map now, off the sampling path."""
        perf_map = self.locate(process)
        with self._lock:
            perf_map.checked_at = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                perf_map.refresh()

    def lookup(self, process: ProcessInfo, address: int) -> str | None:
        """The JIT symbol at address in process, or None."""
        perf_map = self.locate(process)
        name = perf_map.lookup(address)
        # New code shows up as a miss: look again sooner then, still throttled.
        interval = self._recheck_seconds if name else min(self._recheck_seconds, MISS_RECHECK)
        now = time.monotonic()
        if now - perf_map.checked_at >= interval:
            with self._lock:
                perf_map.checked_at = now
                with contextlib.suppress(OSError, ValueError):
                    perf_map.refresh()
                name = perf_map.lookup(address)
        return name
