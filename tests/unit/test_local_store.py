"""LocalStore: atomic files, sidecars, retention, and losing nothing while the disk refuses."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import metrics
from agent.model import Frame, Location, ProfileSample, SeriesProfile
from agent.pprof import build_pprof, parse_pprof
from agent.sinks import Sink
from agent.sinks.local_store import LocalStore, profile_stem
from tests.conftest import REPO, require_tool

NOW = 1_750_000_000.0  # the fake clock: seconds since the epoch
SECOND = 1_000_000_000
LABELS = (("__name__", "process_cpu"), ("service", "checkout"))
NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}(-\d+)?\.pb\.gz$")


def profile(
    start_s: float, payload: bytes | None = None, labels: tuple[tuple[str, str], ...] = LABELS
) -> SeriesProfile:
    start_ns = int(start_s * SECOND)
    samples = (ProfileSample((Location(0x401000, None, frames=(Frame("work"),)),), 7, pid=9),)
    pprof = payload if payload is not None else build_pprof(samples, start_ns, 10 * SECOND, 10**7)
    return SeriesProfile(labels, start_ns, 10 * SECOND, 10**7, samples, pprof)


def metric(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"sink": "local", **labels}) or 0.0


def write_errors() -> float:
    """Failed writes counted by the local store, whatever the errno."""
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == "strobe_sink_errors_total"
        and sample.labels["sink"] == "local"
        and sample.labels["reason"] not in ("backlog_full", "lost_at_close", "delete_failed")
    )


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def store_at(
    directory: Path,
    max_bytes: int = 10**9,
    max_age_seconds: float = 10**9,
    max_backlog_profiles: int = 64,
    clock: Callable[[], float] = lambda: NOW,
) -> LocalStore:
    return LocalStore(
        directory,
        max_bytes,
        max_age_seconds,
        max_backlog_profiles=max_backlog_profiles,
        clock=clock,
    )


def test_write_stores_the_profile_and_its_sidecar(tmp_path: Path) -> None:
    store = store_at(tmp_path / "profiles")
    sink: Sink = store  # LocalStore satisfies the sink protocol
    written = metric("strobe_profiles_written_total")
    written_bytes = metric("strobe_profile_bytes_total")
    item = profile(NOW - 60)
    path = store.write(item)
    assert path is not None and NAME.match(path.name), path
    assert path.name.startswith(profile_stem(item))
    assert path.read_bytes() == item.pprof
    assert parse_pprof(path.read_bytes()).time_nanos == item.start_ns
    meta = json.loads(path.with_name(path.name.replace(".pb.gz", ".json")).read_text())
    assert meta["labels"] == dict(LABELS)
    assert (meta["start_ns"], meta["duration_ns"], meta["samples"]) == (
        item.start_ns,
        10 * SECOND,
        7,
    )
    [stored] = store.list()
    assert (stored.path, stored.labels, stored.start_ns) == (path, LABELS, item.start_ns)
    assert metric("strobe_profiles_written_total") == written + 1
    assert metric("strobe_profile_bytes_total") == written_bytes + len(item.pprof)
    assert sink.name == "local"
    sink.close()


def test_same_series_in_the_same_second_gets_distinct_files(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    first, second = store.write(profile(NOW - 5)), store.write(profile(NOW - 5, b"other"))
    assert first is not None and second is not None and first != second
    assert first.read_bytes() != second.read_bytes()
    assert all(NAME.match(p.name) for p in (first, second))
    other = store.write(profile(NOW - 5, labels=(("__name__", "process_cpu"), ("service", "x"))))
    assert other is not None and other.name[:16] == first.name[:16] and other != first


def test_list_is_oldest_first_newest_last(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    for start in (NOW - 30, NOW - 90, NOW - 60):
        store.write(profile(start))
    assert [p.start_ns for p in store.list()] == [int((NOW - s) * SECOND) for s in (90, 60, 30)]


def test_retention_by_size_drops_the_oldest(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_bytes=3500)
    payloads = [os.urandom(1000) for _ in range(5)]
    for i, payload in enumerate(payloads):
        store.write(profile(NOW - 100 + i, payload))
        assert disk_bytes(tmp_path) <= 3500
    kept = store.list()
    assert [p.path.read_bytes() for p in kept] == payloads[-len(kept) :]
    assert len(kept) == 3  # three 1000-byte profiles and their sidecars fit, four do not


def test_retention_by_age(tmp_path: Path) -> None:
    now = [NOW]
    store = store_at(tmp_path, max_age_seconds=3600, clock=lambda: now[0])
    for age in (3 * 3600, 2 * 3600, 1800, 60):
        store.write(profile(NOW - age))
    assert [NOW - p.start_ns / SECOND for p in store.list()] == [1800, 60]
    now[0] = NOW + 1801  # time passes: the one 1800 s old is now past an hour (at the next write)
    store.write(profile(NOW + 1700))
    assert [round(NOW - p.start_ns / SECOND) for p in store.list()] == [60, -1700]
    assert len(files(tmp_path)) == 4  # two profiles, two sidecars


def test_reopening_indexes_the_store_and_cleans_crash_leftovers(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    for i in range(4):
        store.write(profile(NOW - 40 + i, os.urandom(500)))
    store.close()
    (tmp_path / ".tmp-123-20250101T000000Z-aaaaaaaaaaaa.pb.gz").write_bytes(b"half a prof")
    (tmp_path / "20250101T000000Z-bbbbbbbbbbbb.json").write_text("{}")  # its profile never landed
    before = [p.path for p in store.list()]
    reopened = store_at(tmp_path, max_bytes=1200)  # retention applies at once
    after = reopened.list()
    assert [p.path for p in after] == before[-len(after) :] and 0 < len(after) < 4
    assert disk_bytes(tmp_path) <= 1200
    assert not [n for n in files(tmp_path) if n.startswith(".tmp-") or n.startswith("20250101")]
    assert all(p.labels == LABELS for p in after)


def test_profile_without_sidecar_is_still_listed(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    path = store.write(profile(NOW - 10))
    assert path is not None
    path.with_name(path.name.replace(".pb.gz", ".json")).unlink()
    [stored] = store.list()
    assert stored.labels == () and stored.start_ns == int(NOW - 10) * SECOND


def test_refused_writes_are_backlogged_bounded_and_retried(tmp_path: Path) -> None:
    directory = tmp_path / "profiles"
    store = store_at(directory, max_backlog_profiles=2)
    errors = write_errors()
    dropped = metric("strobe_sink_errors_total", reason="backlog_full")
    shutil.rmtree(directory)
    directory.write_bytes(b"")  # the store's directory is now a file: every write fails
    items = [profile(NOW - 50 + i, f"profile {i}".encode()) for i in range(4)]
    assert [store.write(item) for item in items] == [None] * 4
    assert store.backlog == 2
    assert write_errors() - errors >= 4  # ENOTDIR, then EEXIST from trying to mkdir it
    assert metric("strobe_sink_errors_total", reason="backlog_full") == dropped + 2
    directory.unlink()
    directory.mkdir()  # space is back
    last = profile(NOW - 10, b"profile 4")
    assert store.write(last) is not None
    assert store.backlog == 0
    assert [p.path.read_bytes() for p in store.list()] == [b"profile 2", b"profile 3", b"profile 4"]


def test_close_flushes_the_backlog_and_forbids_later_writes(tmp_path: Path) -> None:
    directory = tmp_path / "profiles"
    store = store_at(directory)
    shutil.rmtree(directory)
    directory.write_bytes(b"")
    assert store.write(profile(NOW - 1, b"late")) is None
    directory.unlink()
    directory.mkdir()
    store.close()
    assert [p.path.read_bytes() for p in store.list()] == [b"late"]
    with pytest.raises(RuntimeError):
        store.write(profile(NOW))


def test_an_unusable_directory_at_start_does_not_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = store_at(blocker / "profiles")  # cannot be created under a file
    assert store.write(profile(NOW - 1, b"kept")) is None
    blocker.unlink()
    blocker.mkdir()  # the store creates its directory once it can
    assert store.write(profile(NOW, b"next")) is not None
    assert [p.path.read_bytes() for p in store.list()] == [b"kept", b"next"]


# -- a disk that refuses part-way: RLIMIT_FSIZE (no root needed) --------------------------

FSIZE_SCRIPT = r"""
import json, os, resource, signal, sys
from pathlib import Path
from agent import metrics
from agent.model import SeriesProfile
from agent.sinks.local_store import LocalStore

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
directory = Path(sys.argv[1])
store = LocalStore(directory, 10**9, 10**9, clock=lambda: 1_750_000_000.0)
def item(i, payload):
    return SeriesProfile((("__name__", "cpu"),), (1_750_000_000 - 60 + i) * 10**9,
                         10**10, 10**7, (), payload)
big = bytes(range(256)) * 256  # 64 KiB
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
refused = store.write(item(0, big))
during = sorted(os.listdir(directory))
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
written = store.write(item(1, b"small"))
print(json.dumps({
    "refused": refused is None,
    "during": during,
    "stored": [p.path.read_bytes() == big for p in store.list()],
    "written": written is not None,
    "efbig": metrics.REGISTRY.get_sample_value(
        "strobe_sink_errors_total", {"sink": "local", "reason": "efbig"}),
}))
"""


def test_write_cut_short_leaves_nothing_visible_and_is_retried(tmp_path: Path) -> None:
    directory = tmp_path / "profiles"
    result = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(directory)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["refused"] and report["written"]
    assert report["during"] == []  # no partial profile, sidecar or temp file
    assert report["stored"] == [True, False]  # the big one (first) intact, then the small one
    assert report["efbig"] == 1.0


# -- a really full disk: a 64 KiB tmpfs (needs root) -----------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    target = tmp_path / "small"
    target.mkdir()
    mount = subprocess.run(
        [require_tool("mount"), "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run([require_tool("umount"), "-l", str(target)], check=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_backlogs_and_writes_everything_once_space_returns(small_fs: Path) -> None:
    store = store_at(small_fs / "profiles")
    enospc = metric("strobe_sink_errors_total", reason="enospc")
    filler = fill(small_fs)
    items = [profile(NOW - 30 + i, os.urandom(8192)) for i in range(3)]
    assert store.write(items[0]) is None
    assert store.write(items[1]) is None
    assert files(small_fs / "profiles") == []  # nothing partial is visible
    assert store.backlog == 2
    assert metric("strobe_sink_errors_total", reason="enospc") >= enospc + 2
    filler.unlink()
    assert store.write(items[2]) is not None
    assert store.backlog == 0
    stored = store.list()
    assert [p.path.read_bytes() for p in stored] == [item.pprof for item in items]
    assert [p.start_ns for p in stored] == [item.start_ns for item in items]
