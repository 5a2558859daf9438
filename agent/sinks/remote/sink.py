"""RemoteSink: ship profiles to a remote store without ever blocking the pipeline.

write() encodes the profile into its request bytes and enqueues them; a sender
thread delivers requests one at a time, in write order.

Guarantees:
- Durable with a spool: when spool_dir is set, write() returns only once the request is
  on disk (written, fsynced, renamed, directory fsynced), so kill -9 or a power loss
  loses nothing written. Memory only caches the payloads at the head of the spool
  (within queue_max_bytes). If the spool cannot take a request (disk full, I/O error),
  it waits in memory instead, as without a spool, and close() tries the spool again.
- Order: requests are delivered in write order, across restarts too (spool files are
  named by sequence number; a new sink continues after the last one).
- Exactly once per acknowledgement: a request leaves the queue (and its spool file is
  deleted) only after the backend acknowledged it. A crash between the ack and the
  deletion, or close() cancelling a call the server had already processed, resends
  that one request on the next start.
- Bounded: the spool by spool_max_bytes (oldest files dropped first, the one in
  flight excepted); memory (the one in flight included) by queue_max_bytes, the oldest
  memory-only request dropped when full. Every drop is counted in
  strobe_remote_profiles_dropped.
- Failures: see retry.py for which codes are retried and the backoff.
- close(timeout): delivers what it can within the timeout (default
  close_timeout_seconds), and not at all while the backend is failing; then stops the
  sender with a short bounded wait. With a spool everything is on disk already;
  without one the rest is counted dropped and logged. A new RemoteSink over the same
  spool_dir delivers the spooled requests first, in order. A sink still open at
  interpreter exit is closed then (timeout 0), so a loss at exit is always recorded.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent import metrics
from agent.model import SeriesProfile
from agent.sinks.remote import otlp, parca
from agent.sinks.remote.channel import Outcome, Transport, check_files
from agent.sinks.remote.config import RemoteStoreConfig
from agent.sinks.remote.retry import backoff_seconds, should_retry
from agent.sinks.remote.spool import Spool, SpoolEntry, SpoolError, read_entry

log = logging.getLogger(__name__)

# close() waits this long for the sender thread once told to stop. The call in flight
# is cancelled, so it exits at once unless stuck in a blocking connect (skip-verify);
# it is a daemon thread, and what it holds is on disk or counted already.
STOP_WAIT_SECONDS = 0.5


@dataclass(frozen=True)
class Codec:
    method: str
    encode: Callable[[SeriesProfile], bytes]
    rejection: Callable[[bytes], str]  # "" when the response accepts everything


def codec_for(config: RemoteStoreConfig) -> Codec:
    if config.protocol == "otlp":
        return Codec(otlp.METHOD, lambda p: otlp.encode(p, config.node), otlp.rejection)
    return Codec(
        parca.METHOD,
        lambda p: parca.encode(p, config.node, config.normalized),
        parca.rejection,
    )


def open_spool(config: RemoteStoreConfig) -> Spool:
    try:
        return Spool(Path(config.spool_dir), config.spool_max_bytes, config.protocol)
    except OSError as exc:
        problem = f"remote store spool_dir: cannot use {config.spool_dir}: {exc.strerror}"
        raise ValueError(problem) from None


@dataclass(eq=False)
class Pending:
    """One queued request: on disk (`spooled`), in memory (`payload`), or both (cached)."""

    seq: int
    payload: bytes | None
    spooled: SpoolEntry | None = None


_OPEN_SINKS: weakref.WeakSet[RemoteSink] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Sinks nobody closed: record what is lost (nothing, with a spool) before exit."""
    for sink in list(_OPEN_SINKS):
        sink.close(timeout=0)


class RemoteSink:
    """The Sink for a Parca or OTLP gRPC endpoint (see the module docstring)."""

    name = "remote"

    def __init__(self, config: RemoteStoreConfig) -> None:
        check_files(config)
        self.config = config
        self._codec = codec_for(config)
        self._transport = Transport(config, self._codec.method)
        self._rng = random.Random()
        self._cond = threading.Condition()
        self._queue: deque[Pending] = deque()  # in seq order; the head may be in flight
        self._memory_bytes = 0  # payloads held in _queue, cached copies included
        self._unspooled_bytes = 0  # payloads held only in memory (no spool, or it refused)
        self._inflight: Pending | None = None
        self._failing = False  # the last send failed and will be retried
        self._closed = False
        self._stop = threading.Event()
        self._drop_logs: dict[str, int] = {}
        self._spool_broken = False  # the last spool write failed (logged once per episode)
        self._spool: Spool | None = None
        if config.spool_dir:
            self._spool = open_spool(config)
            self._dropped("spool_discarded", self._spool.discarded_at_start)
            self._queue.extend(Pending(e.seq, None, e) for e in self._spool.entries)
        self._next_seq = (self._spool.last_seq if self._spool else 0) + 1
        self._update_gauges()
        self._thread = threading.Thread(target=self._run, name="strobe-remote", daemon=True)
        self._thread.start()
        _OPEN_SINKS.add(self)

    # -- the Sink protocol ------------------------------------------------------------

    def problem(self) -> str | None:
        """Set while the spool refuses writes: profiles are then held only in memory,
        which a restart loses (a backend that is down alone is no problem: the queue
        and spool are for that)."""
        with self._cond:
            if self._spool is not None and self._spool_broken:
                return f"remote store spool {self._spool.directory}: cannot write"
        return None

    def write(self, profile: SeriesProfile) -> None:
        """Enqueue one profile (on disk first, with a spool); never blocks on the network."""
        if self._closed:
            self._dropped("closed")
            return
        try:
            payload = self._codec.encode(profile)
        except Exception:  # a bad profile must not stop the others
            log.exception("remote store: cannot encode a profile of %s", dict(profile.labels))
            metrics.SINK_ERRORS.labels(sink=self.name, reason="encode").inc()
            self._dropped("encode")
            return
        if len(payload) > self.config.max_message_bytes:
            self._dropped("too_large")
            return
        with self._cond:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            if not self._enqueue_spooled(seq, payload):
                self._enqueue_memory(Pending(seq, payload))
            self._update_gauges()
            self._cond.notify_all()
        metrics.PROFILES_WRITTEN.labels(sink=self.name).inc()
        metrics.PROFILE_BYTES.labels(sink=self.name).inc(len(payload))

    def close(self, timeout: float | None = None) -> int:
        """Deliver within `timeout` (default close_timeout_seconds) unless the backend is
        failing, stop the sender (bounded wait), then spool or count what memory holds.
        Returns the profiles lost (neither delivered nor spooled)."""
        with self._cond:
            if self._closed:
                return 0
            self._closed = True
        _OPEN_SINKS.discard(self)
        started = time.monotonic()
        self._drain(self.config.close_timeout_seconds if timeout is None else timeout)
        self._stop.set()
        self._transport.cancel()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=STOP_WAIT_SECONDS)
        if self._thread.is_alive():
            log.warning("remote store: sender still busy at close; not waiting for it")
        with self._cond:
            lost = self._spill()
            self._update_gauges()
            left = len(self._queue)
        self._transport.close()
        took = time.monotonic() - started
        kept = f"; {left} profiles kept in the spool for the next start" if self._spool else ""
        log.info("remote store: closed in %.2f s%s", took, kept)
        return lost

    # -- inspection -------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Profiles written but not yet acknowledged or given up on (memory + spool)."""
        with self._cond:
            return len(self._queue)

    @property
    def memory_bytes(self) -> int:
        with self._cond:
            return self._memory_bytes

    def flush(self, timeout: float) -> bool:
        """Wait until everything written so far is delivered or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    def _drain(self, timeout: float) -> None:
        """flush() for close(): no waiting on a backend that is failing right now."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and not self._failing and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    # -- queue (all under self._cond) -------------------------------------------------

    def _enqueue_spooled(self, seq: int, payload: bytes) -> bool:
        """Put the request on disk (cached in memory if there is room); False if not."""
        if self._spool is None:
            return False
        keep = self._inflight.seq if self._inflight else -1
        entry, evicted = self._spool.append(seq, payload, keep)
        self._forget(evicted)
        if entry is None:
            if not self._spool_broken:
                log.warning("remote store: spool refused a request; keeping it in memory")
            self._spool_broken = True
            return False
        self._spool_broken = False
        room = self._memory_bytes + len(payload) <= self.config.queue_max_bytes
        self._queue.append(Pending(seq, payload if room else None, entry))
        self._memory_bytes += len(payload) if room else 0
        return True

    def _forget(self, evicted: Iterable[SpoolEntry]) -> None:
        """Drop the queue items of spool files evicted to make room (counted).

        Evicted files are the oldest, so only the queue's head is walked: O(evicted)."""
        gone = {entry.seq for entry in evicted}
        self._dropped("spool_full", len(gone))
        kept: list[Pending] = []  # the one in flight, memory-only ones
        while gone and self._queue:
            item = self._queue.popleft()
            if item.spooled is not None and item.seq in gone:
                gone.discard(item.seq)
                self._memory_bytes -= len(item.payload or b"")
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))

    def _enqueue_memory(self, item: Pending) -> None:
        """Without a (working) spool: memory only, dropping the oldest when full."""
        assert item.payload is not None
        size, bound = len(item.payload), self.config.queue_max_bytes
        if size > bound:
            self._dropped("too_large")
            return
        self._make_room(bound - size)
        if self._memory_bytes > bound - size:  # only the in-flight one is left
            self._dropped("queue_full")
            return
        self._queue.append(item)
        self._memory_bytes += size
        self._unspooled_bytes += size

    def _make_room(self, limit: int) -> None:
        """Shrink memory to `limit`: uncache spooled copies, then drop the oldest."""
        for item in reversed(self._queue):
            if self._memory_bytes <= limit:
                return
            if item.spooled is not None and item.payload and item is not self._inflight:
                self._memory_bytes -= len(item.payload)
                item.payload = None
        for item in list(self._queue):
            if self._memory_bytes <= limit:
                return
            if item.spooled is None and item is not self._inflight:
                self._queue.remove(item)
                self._memory_bytes -= len(item.payload or b"")
                self._unspooled_bytes -= len(item.payload or b"")
                self._dropped("queue_full")

    def _take(self) -> Pending | None:
        with self._cond:
            while not self._stop.is_set() and not self._queue:
                self._cond.wait()
            if self._stop.is_set():
                return None
            self._inflight = self._queue[0]
            return self._inflight

    def _finish(self, item: Pending) -> None:
        with self._cond:
            if self._inflight is item:
                self._inflight = None
            if self._queue and self._queue[0] is item:  # else counted at close already
                self._queue.popleft()
                self._memory_bytes -= len(item.payload or b"")
                if item.spooled is None:
                    self._unspooled_bytes -= len(item.payload or b"")
                elif self._spool is not None:
                    self._spool.remove(item.spooled)
            self._update_gauges()
            self._cond.notify_all()

    def _spill(self) -> int:
        """At close: spool (or count as lost) what only memory holds; spooled items stay.
        Returns the number lost."""
        left = [item for item in self._queue if item.spooled is None]
        self._queue = deque(item for item in self._queue if item.spooled is not None)
        self._memory_bytes = sum(len(item.payload or b"") for item in self._queue)
        self._unspooled_bytes = 0
        lost = 0
        for item in left:
            if self._spool is None or item.payload is None:
                lost += 1
                continue
            keep = self._inflight.seq if self._inflight else -1
            entry, evicted = self._spool.append(item.seq, item.payload, keep)
            self._forget(evicted)
            if entry is None:
                lost += 1
            else:
                self._queue.append(Pending(item.seq, None, entry))
        self._queue = deque(sorted(self._queue, key=lambda item: item.seq))
        if lost:
            log.warning("remote store: %d profiles undelivered at shutdown, lost", lost)
            self._dropped("shutdown", lost)
        return lost

    # -- sender thread ----------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._take()) is not None:
            try:
                if not self._deliver(item):
                    return  # stopping: close() spills what is left
            except Exception:  # a bug must cost one profile, not every later one
                if self._stop.is_set():
                    return  # close() tore the channel down under the call: keep the item
                log.exception("remote store: dropping a profile after an unexpected error")
                metrics.SINK_ERRORS.labels(sink=self.name, reason="sender").inc()
                self._dropped("sender_error")
            self._finish(item)

    def _deliver(self, item: Pending) -> bool:
        """Send until acknowledged or given up on (True), or until close() (False)."""
        payload = item.payload
        if payload is None and item.spooled is not None:
            try:
                payload = read_entry(item.spooled)
            except SpoolError as exc:
                log.warning("remote store: dropping spooled request: %s", exc)
                self._dropped("spool_corrupt")
                return True
        assert payload is not None
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            outcome = self._transport.send(payload)
            metrics.REMOTE_LATENCY.observe(time.monotonic() - started)
            if outcome.code == grpc.StatusCode.OK:
                self._set_failing(False)
                self._acknowledged(payload, outcome)
                return True
            failures += 1
            metrics.REMOTE_FAILED.labels(code=outcome.code.name).inc()
            if self._stop.is_set():
                return False
            if not should_retry(outcome.code, failures):
                self._give_up(outcome)
                return True
            self._set_failing(True)
            self._note_failure(outcome, failures)
            if self._stop.wait(backoff_seconds(self.config, failures - 1, outcome.code, self._rng)):
                return False
        return False

    def _set_failing(self, failing: bool) -> None:
        """Tell a close() waiting in _drain whether the backend is failing right now."""
        if failing != self._failing:
            with self._cond:
                self._failing = failing
                self._cond.notify_all()

    def _acknowledged(self, payload: bytes, outcome: Outcome) -> None:
        try:
            rejected = self._codec.rejection(outcome.response)
        except Exception as exc:  # an unreadable response still acknowledged the request
            rejected = ""
            log.warning("remote store: unreadable response: %s", exc)
        if rejected:
            log.warning("remote store rejected a profile: %s", rejected)
            self._dropped("rejected")
        else:
            metrics.REMOTE_SENT.inc()
        metrics.REMOTE_BYTES.inc(len(payload))
        metrics.REMOTE_LAST_SUCCESS.set(time.time())

    def _give_up(self, outcome: Outcome) -> None:
        reason = outcome.code.name.lower()
        log.error("remote store: dropping a profile: %s: %s", outcome.code.name, outcome.detail)
        metrics.SINK_ERRORS.labels(sink=self.name, reason=reason).inc()
        self._dropped(reason)

    def _note_failure(self, outcome: Outcome, failures: int) -> None:
        if outcome.code == grpc.StatusCode.UNAVAILABLE and self.config.insecure_skip_verify:
            self._transport.reset()  # re-pin: the server may have a new certificate
        if failures == 1 or failures % 10 == 0:
            log.warning(
                "remote store %s: %s: %s (attempt %d, retrying)",
                self.config.address,
                outcome.code.name,
                outcome.detail,
                failures,
            )

    # -- metrics ----------------------------------------------------------------------

    def _dropped(self, reason: str, count: int = 1) -> None:
        if count <= 0:
            return
        metrics.REMOTE_DROPPED.labels(reason=reason).inc(count)
        seen = self._drop_logs.get(reason, 0)
        self._drop_logs[reason] = seen + count
        if seen == 0 or (seen // 100) != ((seen + count) // 100):
            log.warning("remote store: dropped %d profiles so far (%s)", seen + count, reason)

    def _update_gauges(self) -> None:
        spooled_bytes = self._spool.bytes if self._spool else 0
        metrics.REMOTE_QUEUE_DEPTH.set(len(self._queue))
        metrics.REMOTE_QUEUE_BYTES.set(spooled_bytes + self._unspooled_bytes)
