"""The embedded default sink: gzipped pprof files in a directory, with retention.

Layout: `<dir>/<YYYYmmddTHHMMSSZ>-<labelhash>.pb.gz` (the profile, readable by any pprof
tool) next to `<same stem>.json` (series labels and times). Both appear atomically
(written to a hidden `.tmp-*` file, fsynced, renamed, the directory fsynced: see
agent/util/atomic_file.py), the sidecar first, so a visible profile is always complete and
described. After each write the oldest profiles go until the store fits `max_bytes`, and
every profile that started more than `max_age_seconds` ago goes.

When the disk refuses a write (full, read-only, quota...) the profile waits in a bounded
in-memory backlog and is written, oldest first, before the next profile; only profiles
pushed out of a full backlog are lost, and each one is counted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import threading
import time
from bisect import insort
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent import metrics
from agent.model import SeriesProfile
from agent.util.atomic_file import TMP_PREFIX, write_atomically

log = logging.getLogger(__name__)

SINK_NAME = "local"
PROFILE_SUFFIX = ".pb.gz"
META_SUFFIX = ".json"
TIME_FORMAT = "%Y%m%dT%H%M%SZ"
# The backlog is bounded by bytes (what it costs); the count bound only guards against
# millions of empty profiles. 64 MiB hold ~27 min of a node's windows at 20 series of
# ~20 KB per 10 s window (README "Where profiles go").
DEFAULT_BACKLOG_PROFILES = 100_000
DEFAULT_BACKLOG_BYTES = 64 * 1024 * 1024

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, order=True)
class StoredProfile:
    """One profile on disk. Orders by start time (then name): oldest first."""

    start_ns: int
    path: Path
    labels: Labels = ()
    duration_ns: int = 0
    size: int = 0  # bytes on disk, profile and sidecar


def profile_stem(profile: SeriesProfile) -> str:
    """`<UTC start, to the second>-<12 hex of the series labels' hash>`."""
    started = datetime.fromtimestamp(profile.start_ns / 1e9, tz=UTC).strftime(TIME_FORMAT)
    digest = hashlib.sha256(json.dumps(profile.labels).encode()).hexdigest()[:12]
    return f"{started}-{digest}"


def sidecar(profile: SeriesProfile) -> bytes:
    """The JSON that describes a stored profile (the pprof itself holds no series labels)."""
    meta = {
        "labels": dict(profile.labels),
        "start_ns": profile.start_ns,
        "duration_ns": profile.duration_ns,
        "period_ns": profile.period_ns,
        "samples": sum(s.count for s in profile.samples),
    }
    return json.dumps(meta, sort_keys=True).encode() + b"\n"


def error_reason(exc: OSError) -> str:
    """A bounded metric label for an OSError: the errno name (enospc, erofs, ...)."""
    return errno.errorcode.get(exc.errno or 0, "oserror").lower()


def read_stored(path: Path) -> StoredProfile | None:
    """What a profile file and its sidecar say; None if the profile is gone."""
    meta_path = path.with_name(path.name.removesuffix(PROFILE_SUFFIX) + META_SUFFIX)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    try:
        meta_bytes = meta_path.read_bytes()
        meta = json.loads(meta_bytes)
        labels = tuple(sorted((str(k), str(v)) for k, v in meta["labels"].items()))
        start_ns, duration_ns = int(meta["start_ns"]), int(meta["duration_ns"])
        size += len(meta_bytes)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # no (readable) sidecar: fall back on the time in the name, or the file's mtime
        labels, duration_ns = (), 0
        start_ns = start_from_name(path.name) or int(path.stat().st_mtime * 1e9)
    return StoredProfile(start_ns, path, labels, duration_ns, size)


def start_from_name(name: str) -> int | None:
    try:
        started = datetime.strptime(name[: len("YYYYmmddTHHMMSSZ")], TIME_FORMAT)
    except ValueError:
        return None
    return int(started.replace(tzinfo=UTC).timestamp()) * 1_000_000_000


class LocalStore:
    """Profiles as files in `directory`, bounded by `max_bytes` and `max_age_seconds`.

    Thread-safe. `write` never raises for disk trouble: the profile is backlogged
    (see the module docstring) and the failure is logged and counted.
    """

    name = SINK_NAME

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        max_age_seconds: float,
        *,
        max_backlog_profiles: int = DEFAULT_BACKLOG_PROFILES,
        max_backlog_bytes: int = DEFAULT_BACKLOG_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._max_backlog = (max_backlog_profiles, max_backlog_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._backlog: deque[SeriesProfile] = deque()
        self._backlog_bytes = 0
        self._failing = False
        self._last_error = ""
        self._closed = False
        self._entries: list[StoredProfile] = []  # sorted oldest first
        self._total = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as exc:  # keep going: writes back up and retry until it works
            self._failed(exc, "cannot open the store")

    # -- public ------------------------------------------------------------------------

    def write(self, profile: SeriesProfile) -> Path | None:
        """Store `profile` (after any backlog); its path, or None if it was backlogged."""
        with self._lock:
            if self._closed:
                raise RuntimeError("LocalStore.write after close()")
            if self._flush_backlog():
                try:
                    return self._store(profile)
                except OSError as exc:
                    self._failed(exc, "cannot write profile")
            self._enqueue(profile)
            return None

    def problem(self) -> str | None:
        """Set while the disk refuses writes (full, read-only, gone): profiles back up."""
        with self._lock:
            if not self._failing:
                return None
            return (
                f"local store {self.directory}: {self._last_error}; "
                f"{len(self._backlog)} profiles wait in memory"
            )

    def list(self) -> list[StoredProfile]:
        """The profiles on disk now, oldest first (newest last)."""
        found = (read_stored(path) for path in self._profile_paths())
        return sorted(entry for entry in found if entry is not None)

    @property
    def backlog(self) -> int:
        """Profiles waiting in memory for the disk to take them."""
        with self._lock:
            return len(self._backlog)

    def close(self) -> int:
        """Last try at the backlog; whatever is still in it is lost (counted, returned)."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            if not self._backlog or self._flush_backlog():
                return 0
            lost = len(self._backlog)
            log.error("local store %s: %d profiles lost at shutdown", self.directory, lost)
            metrics.SINK_ERRORS.labels(sink=SINK_NAME, reason="lost_at_close").inc(lost)
            self._backlog.clear()
            return lost

    # -- writing -----------------------------------------------------------------------

    def _store(self, profile: SeriesProfile) -> Path:
        if self._failing:  # the directory may have been missing, or removed meanwhile
            self.directory.mkdir(parents=True, exist_ok=True)
        stem = self._free_stem(profile_stem(profile))
        path = self.directory / (stem + PROFILE_SUFFIX)
        meta_path = self.directory / (stem + META_SUFFIX)
        meta = sidecar(profile)
        write_atomically(meta_path, meta)
        try:
            write_atomically(path, profile.pprof)
        except BaseException:
            meta_path.unlink(missing_ok=True)
            raise
        entry = StoredProfile(
            profile.start_ns,
            path,
            profile.labels,
            profile.duration_ns,
            len(profile.pprof) + len(meta),
        )
        insort(self._entries, entry)
        self._total += entry.size
        metrics.PROFILES_WRITTEN.labels(sink=SINK_NAME).inc()
        metrics.PROFILE_BYTES.labels(sink=SINK_NAME).inc(len(profile.pprof))
        if self._failing:
            self._failing = False
            log.warning("local store %s: writing again", self.directory)
        self._apply_retention()
        return path

    def _free_stem(self, stem: str) -> str:
        """`stem`, or `stem-N` when a profile of the same series and second exists."""
        candidate, n = stem, 0
        while (self.directory / (candidate + PROFILE_SUFFIX)).exists() or (
            self.directory / (candidate + META_SUFFIX)
        ).exists():
            n += 1
            candidate = f"{stem}-{n}"
        return candidate

    def _flush_backlog(self) -> bool:
        """Write backlogged profiles oldest first; False if the disk still refuses."""
        while self._backlog:
            profile = self._backlog[0]
            try:
                self._store(profile)
            except OSError as exc:
                self._failed(exc, f"still cannot write ({len(self._backlog)} backlogged)")
                return False
            self._backlog.popleft()
            self._backlog_bytes -= len(profile.pprof)
        return True

    def _enqueue(self, profile: SeriesProfile) -> None:
        self._backlog.append(profile)
        self._backlog_bytes += len(profile.pprof)
        max_profiles, max_bytes = self._max_backlog
        while len(self._backlog) > max_profiles or self._backlog_bytes > max_bytes:
            dropped = self._backlog.popleft()
            self._backlog_bytes -= len(dropped.pprof)
            log.warning("local store %s: backlog full, dropped a profile", self.directory)
            metrics.SINK_ERRORS.labels(sink=SINK_NAME, reason="backlog_full").inc()

    def _failed(self, exc: OSError, what: str) -> None:
        metrics.SINK_ERRORS.labels(sink=SINK_NAME, reason=error_reason(exc)).inc()
        # once per outage at error level, then quietly until a write works again
        level = logging.DEBUG if self._failing else logging.ERROR
        log.log(
            level,
            "local store %s: %s: %s (profiles are kept in memory and retried)",
            self.directory,
            what,
            exc,
        )
        self._failing = True
        self._last_error = f"{what}: {exc.strerror or exc}"

    # -- retention and index -----------------------------------------------------------

    def _apply_retention(self) -> None:
        cutoff_ns = int((self._clock() - self.max_age_seconds) * 1e9)
        while self._entries and (
            self._total > self.max_bytes or self._entries[0].start_ns < cutoff_ns
        ):
            oldest = self._entries[0]
            try:
                self._delete(oldest.path)
            except OSError as exc:
                log.warning("local store: cannot delete %s: %s", oldest.path, exc)
                metrics.SINK_ERRORS.labels(sink=SINK_NAME, reason="delete_failed").inc()
                return
            del self._entries[0]
            self._total -= oldest.size

    @staticmethod
    def _delete(path: Path) -> None:
        path.unlink(missing_ok=True)  # the profile first: a sidecar alone is cleaned later
        path.with_name(path.name.removesuffix(PROFILE_SUFFIX) + META_SUFFIX).unlink(missing_ok=True)

    def _load(self) -> None:
        """Index what is on disk; remove what a crash left half-done."""
        profiles = set()
        for path in self.directory.iterdir():
            if path.name.startswith(TMP_PREFIX):
                path.unlink(missing_ok=True)  # an interrupted write
            elif path.name.endswith(PROFILE_SUFFIX):
                profiles.add(path.name.removesuffix(PROFILE_SUFFIX))
        for path in self.directory.glob("*" + META_SUFFIX):
            if path.name.removesuffix(META_SUFFIX) not in profiles:
                path.unlink(missing_ok=True)  # sidecar whose profile never landed
        self._entries = self.list()
        self._total = sum(entry.size for entry in self._entries)
        self._apply_retention()

    def _profile_paths(self) -> Iterator[Path]:
        try:
            paths = list(self.directory.glob("*" + PROFILE_SUFFIX))
        except OSError:
            return iter(())
        return (p for p in paths if not p.name.startswith(TMP_PREFIX))
