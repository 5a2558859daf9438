"""Durability and shutdown of the remote sink.

- kill -9 of a process writing to a spooled sink, at a random moment: every profile whose
  write() had returned is delivered by the next sink over the spool, in order, with at
  most one duplicate per kill (a crash between the ack and the spool delete).
- close() with the backend down or hung returns within 2 s, leaves the queue on disk
  (or, without a spool, counts and logs the loss), and logs no traceback.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.model import SeriesProfile
from agent.sinks.remote import RemoteSink, parca
from agent.sinks.remote.spool import HEADER_BYTES
from tests.conftest import REPO
from tests.remote.backend import Backend, make_profile, wait_until
from tests.remote.conftest import MetricDelta

DROPPED = "strobe_remote_profiles_dropped_total"
FAILED = "strobe_remote_profiles_failed_total"
KILLS = 3
RANGE = 100_000  # the k-th child writes ids k * RANGE + 1, k * RANGE + 2, ...
CLOSE_BUDGET = 2.0  # seconds the sink may add to the agent's exit with the backend away


def run_and_kill(address: str, spool: Path, first: int, out: Path, rng: random.Random) -> list[int]:
    """Run tests/remote/sink_child.py, kill -9 it at a random moment; the ids it printed."""
    command = [sys.executable, "-m", "tests.remote.sink_child", address, str(spool)]
    with open(out, "w") as handle:
        child = subprocess.Popen([*command, str(first), str(RANGE - 1)], cwd=REPO, stdout=handle)
    try:
        assert wait_until(lambda: bool(out.read_text().strip()) or child.poll() is not None)
        assert child.poll() is None, "the child ended before the kill"
        time.sleep(rng.uniform(0.0, 1.0))
    finally:
        child.kill()  # SIGKILL
        child.wait()
    words = out.read_text().split()
    assert "done" not in words, "the child wrote everything before the kill"
    printed = [int(word) for word in words]
    assert printed == list(range(first, first + len(printed)))
    return printed


def check_delivered(ids: list[int], printed: dict[int, list[int]], duplicates: int) -> None:
    """All printed ids arrived, in order; beyond them per child only the one whose write()
    returned just before the kill; at most `duplicates` repeats, each right after itself."""
    repeats = sum(1 for before, after in zip(ids, ids[1:], strict=False) if before == after)
    assert repeats <= duplicates, f"{repeats} duplicates"
    unique = [ident for k, ident in enumerate(ids) if k == 0 or ids[k - 1] != ident]
    assert unique == sorted(set(unique)), "out of order, or a repeat later than the next one"
    for first, accepted in printed.items():
        got = [ident for ident in unique if first <= ident < first + RANGE]
        assert got[: len(accepted)] == accepted, f"lost {sorted(set(accepted) - set(got))[:10]}"
        assert len(got) - len(accepted) in (0, 1)


@pytest.mark.parametrize("outage", [True, False], ids=["backend-down", "backend-up"])
def test_kill_9_loses_no_profile_that_write_accepted(
    backends: Callable[..., Backend],
    sinks: Callable[..., RemoteSink],
    tmp_path: Path,
    outage: bool,
) -> None:
    backend = backends("parca")
    if outage:
        backend.stop()
    spool = tmp_path / "spool"
    seed = random.randrange(2**32)
    print(f"kill moments from random.Random({seed})")  # shown if the test fails
    rng = random.Random(seed)
    printed = {}
    for kill in range(KILLS):
        first = kill * RANGE + 1
        printed[first] = run_and_kill(backend.address, spool, first, tmp_path / f"{kill}.out", rng)
    if outage:
        assert backend.ids() == []
        backend.start()
    sink = sinks(address=backend.address, spool_dir=str(spool))
    assert sink.flush(60)
    # Down: nothing was ever acknowledged, so nothing may repeat. Up: one per kill at most.
    check_delivered(backend.ids(), printed, duplicates=0 if outage else KILLS)
    assert list(spool.iterdir()) == []


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def make_backend_away(backend: Backend, how: str, delta: MetricDelta) -> Callable[[], bool]:
    """Stop the backend or make it hang; a check that the sink is trying and failing."""
    if how == "down":
        backend.stop()
        return lambda: delta(FAILED, code="UNAVAILABLE") >= 1
    backend.recorder.gate.clear()  # accepts calls, never answers
    return lambda: backend.recorder.arrivals >= 1


@pytest.mark.parametrize("how", ["down", "hung"])
def test_close_with_the_backend_away_is_quick_and_leaves_the_queue_on_disk(
    backends: Callable[..., Backend],
    sinks: Callable[..., RemoteSink],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    delta: MetricDelta,
    how: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = backends("parca")
    trying = make_backend_away(backend, how, delta)
    spool = tmp_path / "spool"
    sink = sinks(address=backend.address, spool_dir=str(spool), queue_max_bytes=64 * 1024)
    for ident in range(1, 501):
        sink.write(make_profile(ident, padding=2000))
    assert wait_until(trying)
    started = time.monotonic()
    sink.close()  # the default budget, as the agent's shutdown calls it
    took = time.monotonic() - started
    assert took < CLOSE_BUDGET
    assert len(list(spool.iterdir())) == 500
    assert no_tracebacks(caplog) == []
    assert delta(DROPPED, reason="shutdown") == 0

    fresh = backends("parca")  # the queue on disk is the whole queue, in order
    assert sinks(address=fresh.address, spool_dir=str(spool)).flush(60)
    assert fresh.ids() == list(range(1, 501))


def test_close_without_a_spool_is_quick_and_counts_and_logs_the_loss(
    backends: Callable[..., Backend],
    sinks: Callable[..., RemoteSink],
    caplog: pytest.LogCaptureFixture,
    delta: MetricDelta,
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = backends("parca")
    trying = make_backend_away(backend, "down", delta)
    sink = sinks(address=backend.address)
    for ident in range(1, 301):
        sink.write(make_profile(ident))
    assert wait_until(trying)
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < CLOSE_BUDGET
    assert delta(DROPPED, reason="shutdown") == 300
    assert any("300 profiles undelivered at shutdown" in r.getMessage() for r in caplog.records)
    assert no_tracebacks(caplog) == []


def test_a_sink_left_open_at_exit_records_its_loss(backends: Callable[..., Backend]) -> None:
    backend = backends("parca")
    backend.stop()
    program = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from agent.sinks.remote import RemoteSink, RemoteStoreConfig\n"
        "from tests.remote.backend import make_profile\n"
        "sink = RemoteSink(RemoteStoreConfig(address=sys.argv[1], insecure=True))\n"
        "for ident in range(5):\n"
        "    sink.write(make_profile(ident))\n"  # and exit without close()
    )
    done = subprocess.run(
        [sys.executable, "-c", program, backend.address],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "5 profiles undelivered at shutdown" in done.stderr
    assert "Traceback" not in done.stderr


def big_profile(ident: int) -> SeriesProfile:
    """A profile whose request is ~8 KiB (incompressible), still recognisable by `ident`."""
    pprof = gzip.compress(f"profile-{ident:06d}-".encode() + os.urandom(8192), mtime=0)
    return dataclasses.replace(make_profile(ident), pprof=pprof)


def test_what_the_spool_refuses_waits_in_memory_in_order(
    backends: Callable[..., Backend],
    sinks: Callable[..., RemoteSink],
    tmp_path: Path,
    delta: MetricDelta,
) -> None:
    backend = backends("parca")
    backend.stop()
    spool = tmp_path / "spool"
    small = HEADER_BYTES + len(parca.encode(make_profile(1), "", False))
    sink = sinks(address=backend.address, spool_dir=str(spool), spool_max_bytes=small * 5 // 2)
    for ident in (1, 2, 3, 4):  # even ids are too big for the spool: memory takes them
        sink.write(make_profile(ident) if ident % 2 else big_profile(ident))
    assert len(list(spool.iterdir())) == 2
    assert sink.pending == 4
    backend.start()
    assert sink.flush(60)
    assert backend.ids() == [1, 2, 3, 4]
    assert delta(DROPPED, reason="spool_full") == 0
    assert delta(DROPPED, reason="queue_full") == 0
