"""A bounded cache of processes keyed by pid + start time.

Lifecycle the daemon follows each window:
    capture(pid)      as early as a process is seen (so it is known even if it exits);
                      capture_live(pid) when the caller goes on to work on the live
                      process (its unwind tables, its Python): not a past capture
    get(pid)          while attributing the window's samples (marks it used); a pid
                      that could not be read is not read again until end_window()
    get_covering(...) when an address may lie in code mapped after the capture
    end_window()      after the drain: forgets processes that exited
A process that exited keeps its entry until a window that used it has ended (or a
few windows passed without use), so samples drained after its exit are still named.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.metrics import PROCESS_CACHE_SIZE, PROCESSES_SEEN
from agent.model import ProcessInfo
from agent.process.mapindex import MappingIndex
from agent.process.reader import PROC, read_process, read_start, running

MAX_COVERED = 1 << 16  # addresses remembered as mapped, per process


@dataclass
class _Entry:
    info: ProcessInfo
    used_this_window: bool = False
    refreshed_window: int = -1  # the window in which maps were last re-read
    dead_windows: int = 0  # windows ended since we found the process gone, unused
    # Built on first use and dropped with `info`: get_covering checks every address of
    # every stack, and most addresses repeat, so known ones cost one set lookup.
    _index: MappingIndex | None = None
    _covered: set[int] = field(default_factory=lambda: {0})  # 0: no address, never checked

    def replace(self, info: ProcessInfo) -> None:
        self.info, self._index, self._covered = info, None, {0}

    def covers(self, addresses: Iterable[int]) -> bool:
        """Whether every non-zero address lies in one of info's mappings."""
        addresses = addresses if isinstance(addresses, tuple) else tuple(addresses)  # read twice
        covered = self._covered
        if covered.issuperset(addresses):
            return True
        if self._index is None:
            self._index = MappingIndex(self.info.mappings)
        if len(covered) > MAX_COVERED:
            covered.clear()
            covered.add(0)
        for address in addresses:
            if address not in covered:
                if self._index.find(address) is None:
                    return False
                covered.add(address)
        return True


class ProcessCache:
    """Processes by pid, each read once per pid + start time; bounded LRU.

    Thread-safe: an exec-event thread may capture while the drain reads.
    """

    # One window of grace: an exited process's samples are all in the drain of a window
    # it was alive in, so one that no window used is kept only against a late capture.
    # Under churn (~125 exits/s, 10 s windows) each extra window holds ~1,250 more.
    def __init__(self, max_entries: int = 4096, proc: Path = PROC, grace_windows: int = 1) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._proc = proc
        self._grace_windows = grace_windows
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        # pids get() could not read this window. A window's samples of a process that
        # exited uncaptured would otherwise each cost a failed /proc read.
        self._unreadable: set[int] = set()
        self._window = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def capture(self, pid: int, reread: bool = False) -> ProcessInfo | None:
        """Read pid unless it is already known with the same start time.

        `reread` reads it again anyway: after an exec the start time is unchanged but
        the image is new. When the process is gone, the last capture (if any) is
        returned: it is the best knowledge of what ran under this pid.
        """
        info, past = self._capture(pid, reread)
        return info if info is not None else past

    def capture_live(self, pid: int, reread: bool = False) -> ProcessInfo | None:
        """capture(), but None when the process is gone: only a capture of the live
        process (read now, or known and found running with the same start time)."""
        return self._capture(pid, reread)[0]

    def _capture(self, pid: int, reread: bool) -> tuple[ProcessInfo | None, ProcessInfo | None]:
        """(the live process's capture, else None; the last capture of a gone one)."""
        with self._lock:
            entry = self._entries.get(pid)
            past = entry.info if entry is not None else None
            if entry is not None and not reread:  # known: is it still the same process?
                try:
                    _, start_time = read_start(pid, self._proc)
                except (OSError, ValueError):
                    return None, past
                if entry.info.start_time == start_time:
                    self._entries.move_to_end(pid)
                    return entry.info, None
            info = read_process(pid, self._proc)  # counts its own read errors
            if info is None:
                return None, past
            self._store(pid, _Entry(info))
            self._unreadable.discard(pid)
            PROCESSES_SEEN.inc()
            return info, None

    def get(self, pid: int) -> ProcessInfo | None:
        """The known process for pid (captured now if unknown); marks it used this window."""
        with self._lock:
            entry = self._use(pid)
            return entry.info if entry is not None else None

    def _use(self, pid: int) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(pid)
            if entry is None:
                if pid in self._unreadable:
                    return None
                if self.capture(pid) is None:
                    self._unreadable.add(pid)
                    return None
                entry = self._entries[pid]
            entry.used_this_window = True
            self._entries.move_to_end(pid)
            return entry

    def refresh(self, pid: int) -> ProcessInfo | None:
        """Re-read pid's mappings (new code was mapped), at most once per window."""
        with self._lock:
            entry = self._entries.get(pid)
            if entry is None:
                return self.get(pid)
            if entry.refreshed_window == self._window:
                return entry.info
            entry.refreshed_window = self._window
            info = read_process(pid, self._proc)
            if info is not None and info.start_time == entry.info.start_time:
                entry.replace(info)
            return entry.info

    def get_covering(self, pid: int, addresses: Iterable[int]) -> ProcessInfo | None:
        """get(pid), refreshed once per window if an address lies outside all mappings."""
        with self._lock:
            entry = self._use(pid)
            if entry is None:
                return None
            if not entry.info.mappings or entry.covers(addresses):
                return entry.info  # kernel thread (nothing to refresh against), or covered
        return self.refresh(pid)

    def end_window(self) -> None:
        """Forget processes that exited: at once if this window used them, else after grace."""
        with self._lock:
            for pid, entry in list(self._entries.items()):
                if self._is_alive(pid, entry.info.start_time):
                    entry.dead_windows = 0
                elif entry.used_this_window or entry.dead_windows >= self._grace_windows:
                    del self._entries[pid]
                else:
                    entry.dead_windows += 1
                entry.used_this_window = False
            self._unreadable.clear()
            self._window += 1
            PROCESS_CACHE_SIZE.set(len(self._entries))

    def _store(self, pid: int, entry: _Entry) -> None:
        self._entries[pid] = entry
        self._entries.move_to_end(pid)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        PROCESS_CACHE_SIZE.set(len(self._entries))

    def _is_alive(self, pid: int, start_time: int) -> bool:
        return running(pid, start_time, self._proc)
