"""Delivery: order, exactly once, retries by status code, the byte bound of the queue."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from agent.sinks.remote import parca, retry
from tests.remote.backend import make_profile, wait_until

SENT = "strobe_remote_profiles_sent_total"
FAILED = "strobe_remote_profiles_failed_total"
DROPPED = "strobe_remote_profiles_dropped_total"
SINK_ERRORS = "strobe_sink_errors_total"


@pytest.mark.parametrize("protocol", ["parca", "otlp"])
def test_outage_at_start_and_mid_run_loses_and_repeats_nothing(backends, sinks, delta, protocol):
    backend = backends(protocol)
    backend.stop()  # down at start; its port is kept for the restart
    sink = sinks(address=backend.address, protocol=protocol)
    for ident in (1, 2, 3):
        sink.write(make_profile(ident))
    assert wait_until(lambda: delta(FAILED, code="UNAVAILABLE") >= 2)  # it did try, and fail
    assert sink.pending == 3

    backend.start()
    assert sink.flush(60)
    for ident in (4, 5, 6):  # acknowledged one by one: nothing is in flight at the kill
        sink.write(make_profile(ident))
        assert sink.flush(60)
    backend.stop()
    failed_before = delta(FAILED, code="UNAVAILABLE")
    for ident in (7, 8, 9):
        sink.write(make_profile(ident))
    assert wait_until(lambda: delta(FAILED, code="UNAVAILABLE") >= failed_before + 2)
    assert sink.pending == 3

    backend.start()
    assert sink.flush(60)
    assert backend.ids() == list(range(1, 10))
    assert delta(SENT) == 9
    assert delta(DROPPED, reason="queue_full") == 0


def test_resource_exhausted_is_retried(backends, sinks, delta):
    backend = backends("parca")
    backend.recorder.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    sink = sinks(address=backend.address, protocol="parca")
    sink.write(make_profile(1))
    sink.write(make_profile(2))
    assert sink.flush(60)
    assert backend.ids() == [1, 2]
    assert delta(FAILED, code="RESOURCE_EXHAUSTED") == 2
    assert delta(DROPPED, reason="resource_exhausted") == 0


def test_invalid_argument_is_dropped_and_counted(backends, sinks, delta):
    backend = backends("otlp")
    backend.recorder.failures = [grpc.StatusCode.INVALID_ARGUMENT]
    sink = sinks(address=backend.address, protocol="otlp")
    sink.write(make_profile(1))
    sink.write(make_profile(2))
    assert sink.flush(60)
    assert backend.ids() == [2]
    assert delta(FAILED, code="INVALID_ARGUMENT") == 1
    assert delta(DROPPED, reason="invalid_argument") == 1
    assert delta(SINK_ERRORS, sink="remote", reason="invalid_argument") == 1
    assert delta(SENT) == 1


def test_internal_is_retried_a_few_times_then_dropped(backends, sinks, delta):
    backend = backends("parca")
    sink = sinks(address=backend.address, protocol="parca")
    backend.recorder.failures = [grpc.StatusCode.INTERNAL] * 2
    sink.write(make_profile(1))  # fails twice, then goes through
    assert sink.flush(60)
    backend.recorder.failures = [grpc.StatusCode.INTERNAL] * (retry.FEW + 1)
    sink.write(make_profile(2))  # first try and FEW retries fail: given up
    sink.write(make_profile(3))
    assert sink.flush(60)
    assert backend.ids() == [1, 3]
    assert delta(FAILED, code="INTERNAL") == 2 + retry.FEW + 1
    assert delta(DROPPED, reason="internal") == 1


def test_write_does_not_wait_for_a_hung_backend(backends, sinks):
    backend = backends("parca")
    backend.recorder.gate.clear()  # the server accepts calls but never answers
    sink = sinks(address=backend.address, protocol="parca")
    for ident in range(1, 6):
        sink.write(make_profile(ident))  # returns although the first call hangs
    assert sink.pending == 5
    backend.recorder.gate.set()
    assert sink.flush(60)
    assert backend.ids() == [1, 2, 3, 4, 5]


def test_queue_byte_bound_holds_and_oldest_are_dropped(backends, sinks, delta):
    backend = backends("parca")
    backend.stop()
    size = len(parca.encode(make_profile(1), "", False))
    bound = 3 * size + size // 2  # room for exactly three requests
    sink = sinks(address=backend.address, protocol="parca", queue_max_bytes=bound)
    for ident in range(1, 11):
        sink.write(make_profile(ident))
        assert sink.memory_bytes <= bound
    assert delta(DROPPED, reason="queue_full") == 7
    assert sink.pending == 3

    backend.start()
    assert sink.flush(60)
    ids = backend.ids()
    assert len(ids) == 3 and ids == sorted(ids) and ids[-2:] == [9, 10]


def test_too_large_for_the_queue_or_message_is_dropped(backends, sinks, delta):
    backend = backends("parca")
    sink = sinks(address=backend.address, protocol="parca", max_message_bytes=4096)
    sink.write(make_profile(1, padding=100_000))  # gzip of repeated bytes stays small
    sink.write(make_profile(2, padding=0))
    big = make_profile(3)
    sink.write(dataclasses.replace(big, pprof=bytes(range(256)) * 64))
    assert sink.flush(60)
    assert backend.ids() == [1, 2]
    assert delta(DROPPED, reason="too_large") == 1


def test_close_without_spool_counts_what_was_left(backends, sinks, delta):
    backend = backends("parca")
    backend.stop()
    sink = sinks(address=backend.address, protocol="parca")
    for ident in (1, 2, 3):
        sink.write(make_profile(ident))
    sink.close(timeout=0.1)
    sink.write(make_profile(4))
    assert delta(DROPPED, reason="shutdown") == 3
    assert delta(DROPPED, reason="closed") == 1
    assert sink.pending == 0
