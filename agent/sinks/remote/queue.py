"""RemoteSink: ship profiles to a remote store without ever blocking the pipeline.

write() encodes the profile into its request bytes and enqueues them; a sender
thread delivers requests one at a time, in write order.

Guarantees:
- Order: requests are delivered in write order. Memory holds the oldest pending
  requests and the spool the newer ones: once anything is spooled, new writes go to
  the spool too until it drains, and the sender takes memory first, then the spool.
- Exactly once per acknowledgement: a request leaves the queue (or its spool file is
  deleted) only after the backend acknowledged it. A crash between the ack and the
  deletion of the spool file, or close() cancelling a call the server had already
  processed, resends that one request on the next start.
- Bounded memory: the queued requests (the one in flight included) never exceed
  queue_max_bytes. When full, new requests go to the disk spool if one is configured
  (bounded by spool_max_bytes, oldest files dropped first); without a spool the oldest
  queued request is dropped. Every drop is counted in strobe_remote_profiles_dropped.
- Failures: see retry.py for which codes are retried and the backoff.
- close(timeout): delivers what it can within the timeout, then moves what is left
  to the spool (or counts it dropped without one). A new RemoteSink over the same
  spool_dir delivers the spooled requests first, in order.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
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


@dataclass(frozen=True)
class Pending:
    seq: int
    payload: bytes | None  # None: only on disk, in `spooled`
    spooled: SpoolEntry | None = None


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
        self._memory: deque[Pending] = deque()
        self._memory_bytes = 0  # includes the in-flight request when it came from memory
        self._inflight: Pending | None = None
        self._closed = False
        self._stop = threading.Event()
        self._drop_logs: dict[str, int] = {}
        self._spool: Spool | None = None
        if config.spool_dir:
            self._spool = open_spool(config)
            self._dropped("spool_discarded", self._spool.discarded_at_start)
        self._next_seq = (self._spool.last_seq if self._spool else 0) + 1
        self._update_gauges()
        self._thread = threading.Thread(target=self._run, name="strobe-remote", daemon=True)
        self._thread.start()

    # -- the Sink protocol ------------------------------------------------------------

    def write(self, profile: SeriesProfile) -> None:
        """Enqueue one profile; never blocks on the network."""
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
            self._enqueue(Pending(seq, payload))
            self._update_gauges()
            self._cond.notify_all()
        metrics.PROFILES_WRITTEN.labels(sink=self.name).inc()
        metrics.PROFILE_BYTES.labels(sink=self.name).inc(len(payload))

    def close(self, timeout: float | None = None) -> None:
        """Deliver within `timeout` (default close_timeout_seconds), spool the rest."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush(self.config.close_timeout_seconds if timeout is None else timeout)
        self._stop.set()
        self._transport.cancel()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10)
        with self._cond:
            self._spill()
            self._update_gauges()
        self._transport.close()

    # -- inspection -------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Profiles written but not yet acknowledged or given up on (memory + spool)."""
        with self._cond:
            return self._pending_locked()

    @property
    def memory_bytes(self) -> int:
        with self._cond:
            return self._memory_bytes

    def flush(self, timeout: float) -> bool:
        """Wait until everything written so far is delivered or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending_locked():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    # -- queue (all under self._cond) -------------------------------------------------

    def _pending_locked(self) -> int:
        in_memory = len(self._memory) + (1 if self._inflight and not self._inflight.spooled else 0)
        return in_memory + (len(self._spool) if self._spool else 0)

    def _enqueue(self, item: Pending) -> None:
        assert item.payload is not None
        size, bound = len(item.payload), self.config.queue_max_bytes
        if self._spool is not None and (self._spool.entries or self._memory_bytes + size > bound):
            keep = self._inflight.seq if self._inflight else -1
            stored, evicted = self._spool.append(item.seq, item.payload, keep)
            self._dropped("spool_full", len(evicted))
            if not stored:
                self._dropped("spool_rejected")
            return
        while self._memory and self._memory_bytes + size > bound:
            oldest = self._memory.popleft()
            self._memory_bytes -= len(oldest.payload or b"")
            self._dropped("queue_full")
        if self._memory_bytes + size > bound:  # too big, or only the in-flight one is left
            self._dropped("too_large" if size > bound else "queue_full")
            return
        self._memory.append(item)
        self._memory_bytes += size

    def _take(self) -> Pending | None:
        with self._cond:
            while not self._stop.is_set() and not self._memory and not self._spool_head():
                self._cond.wait()
            if self._stop.is_set():
                return None
            if self._memory:
                self._inflight = self._memory.popleft()
            else:
                entry = self._spool_head()
                assert entry is not None
                self._inflight = Pending(entry.seq, None, entry)
            return self._inflight

    def _spool_head(self) -> SpoolEntry | None:
        return self._spool.head() if self._spool is not None else None

    def _finish(self, item: Pending) -> None:
        with self._cond:
            self._inflight = None
            if item.spooled is not None and self._spool is not None:
                self._spool.remove(item.spooled)
            else:
                self._memory_bytes -= len(item.payload or b"")
            self._update_gauges()
            self._cond.notify_all()

    def _spill(self) -> None:
        """At close: move what memory still holds (oldest first) to the spool."""
        left = [self._inflight] if self._inflight and not self._inflight.spooled else []
        left += list(self._memory)
        self._inflight = None
        self._memory.clear()
        self._memory_bytes = 0
        if not left:
            return
        if self._spool is None:
            log.warning("remote store: %d profiles undelivered at shutdown", len(left))
            self._dropped("shutdown", len(left))
            return
        for item in left:
            stored, evicted = self._spool.append(item.seq, item.payload or b"")
            self._dropped("spool_full", len(evicted))
            if not stored:
                self._dropped("shutdown")

    # -- sender thread ----------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._take()) is not None:
            try:
                if not self._deliver(item):
                    return  # stopping: close() spills what is left
            except Exception:  # a bug must cost one profile, not every later one
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
                self._acknowledged(payload, outcome)
                return True
            failures += 1
            metrics.REMOTE_FAILED.labels(code=outcome.code.name).inc()
            if self._stop.is_set():
                return False
            if not should_retry(outcome.code, failures):
                self._give_up(outcome)
                return True
            self._note_failure(outcome, failures)
            if self._stop.wait(backoff_seconds(self.config, failures - 1, outcome.code, self._rng)):
                return False
        return False

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
        metrics.REMOTE_QUEUE_DEPTH.set(self._pending_locked())
        metrics.REMOTE_QUEUE_BYTES.set(self._memory_bytes + spooled_bytes)
