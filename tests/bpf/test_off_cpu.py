"""Off-CPU profiles on the real kernel: where threads block, and for how long.

Each test profiles a program of known shape with the real command (`strobe record
--off-cpu`, `strobe run --off-cpu`) and reads the pprof it wrote:
- tests/data/c/offcpu_sleep_poll.c: main -> run_phase -> sleep_leaf (nanosleep, 60% of
  the blocked time) and poll_leaf (poll on an idle pipe with a timeout, 40%), built with
  and without frame pointers;
- tests/data/c/offcpu_mutex.c: a holder thread keeps one mutex most of the time, a
  waiter thread (waiter_thread -> wait_for_lock) waits for it;
- a CPython program whose handler() sleeps in nap() and waits in wait_pipe().
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.pprof.builder import parse_pprof
from agent.pprof.proto import profile_pb2
from tests.bpf.test_python_frames import interpreter
from tests.conftest import REPO, require_tool
from tests.integration.strobe_run import start_strobe_run, stop_strobe_run
from tests.integration.test_pull_auth import free_port

pytestmark = pytest.mark.bpf

SOURCES = REPO / "tests" / "data" / "c"
RECORD_SECONDS = 8


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("offcpu")
    gcc = require_tool("gcc")
    builds = {
        "sleep_poll_fp": ["-O0", "-fno-omit-frame-pointer", str(SOURCES / "offcpu_sleep_poll.c")],
        "sleep_poll_nofp": ["-O2", "-fomit-frame-pointer", str(SOURCES / "offcpu_sleep_poll.c")],
        "mutex": ["-O2", "-pthread", str(SOURCES / "offcpu_mutex.c")],
    }
    for name, args in builds.items():
        subprocess.run([gcc, "-g", "-o", str(out / name), *args], check=True)
    return {name: out / name for name in builds}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("offcpu-cache")  # the program compiles once per module


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def record_off_cpu(pid: int, output: Path, cache_dir: Path, *extra: str) -> profile_pb2.Profile:
    subprocess.run(
        [sys.executable, "-m", "agent", "record", "--off-cpu", "--pid", str(pid)]
        + ["--duration", str(RECORD_SECONDS), "--output", str(output)]
        + ["--cache-dir", str(cache_dir), *extra],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=180,
    )
    return parse_pprof(output.read_bytes())


def functions(profile: profile_pb2.Profile, sample: profile_pb2.Sample) -> list[str]:
    """The sample's function names, innermost first (inlined frames included)."""
    strings = profile.string_table
    names = {f.id: strings[f.name] for f in profile.function}
    locations = {loc.id: loc for loc in profile.location}
    return [
        names[line.function_id]
        for location_id in sample.location_id
        for line in locations[location_id].line
    ]


def blocked_ns(profile: profile_pb2.Profile, in_function: str) -> int:
    return sum(s.value[1] for s in profile.sample if in_function in functions(profile, s))


def value_types(profile: profile_pb2.Profile) -> list[tuple[str, str]]:
    strings = profile.string_table
    return [(strings[t.type], strings[t.unit]) for t in profile.sample_type]


@pytest.mark.parametrize(
    ("build", "max_rate"),
    [
        ("sleep_poll_fp", "0"),  # every blocking switch walked
        ("sleep_poll_nofp", "0"),
        # ~400 blocking switches a second, 50 walked: each counts for ~8, and the
        # estimate must still land in the same bounds
        ("sleep_poll_nofp", "50"),
    ],
)
def test_blocked_time_splits_between_the_two_leaves_and_reaches_main(
    require_bpf: None,
    programs: dict[str, Path],
    cache_dir: Path,
    running: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    build: str,
    max_rate: str,
) -> None:
    program = subprocess.Popen([str(programs[build]), str(RECORD_SECONDS + 30)])
    running.append(program)
    time.sleep(0.5)
    output = tmp_path / "off.pb.gz"
    profile = record_off_cpu(program.pid, output, cache_dir, "--off-cpu-max-rate", max_rate)

    assert value_types(profile) == [("samples", "count"), ("off_cpu", "nanoseconds")]
    total = sum(s.value[1] for s in profile.sample)
    wall = profile.duration_nanos
    assert 0.60 * wall <= total <= 1.10 * wall, (total, wall)
    sleep, poll = blocked_ns(profile, "sleep_leaf"), blocked_ns(profile, "poll_leaf")
    share = 100 * sleep / (sleep + poll)
    assert 50 <= share <= 70, (sleep, poll)
    intervals = sum(s.value[0] for s in profile.sample)
    reached = sum(s.value[0] for s in profile.sample if "main" in functions(profile, s))
    assert reached >= 0.90 * intervals, (reached, intervals)
    # The kernel side says why it blocked, from the scheduler down.
    kernel = {name for s in profile.sample for name in functions(profile, s)}
    assert {"__schedule", "do_nanosleep", "do_sys_poll"} <= kernel, sorted(kernel)


def test_the_waiter_of_a_contended_mutex_shows_the_lock_wait(
    require_bpf: None,
    programs: dict[str, Path],
    cache_dir: Path,
    running: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    program = subprocess.Popen([str(programs["mutex"]), str(RECORD_SECONDS + 30)])
    running.append(program)
    time.sleep(0.5)
    profile = record_off_cpu(program.pid, tmp_path / "mutex.pb.gz", cache_dir)

    waiter = [s for s in profile.sample if "waiter_thread" in functions(profile, s)]
    assert waiter, "no blocked stack of the waiter thread"
    waiting = sum(s.value[1] for s in waiter)
    in_lock = [s for s in waiter if "wait_for_lock" in functions(profile, s)]
    locked = sum(s.value[1] for s in in_lock)
    assert locked >= 0.5 * waiting, (locked, waiting)
    names = set(functions(profile, max(in_lock, key=lambda s: s.value[1])))
    assert any("futex" in name for name in names), sorted(names)  # the kernel's lock wait
    assert any("lock" in name and "pthread" in name or "lll_lock" in name for name in names), (
        sorted(names)
    )


def fetch(url: str, token: str = "") -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


def test_run_stores_and_serves_off_cpu_series_and_counts_them(
    require_bpf: None,
    programs: dict[str, Path],
    running: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """strobe run --off-cpu: the local store holds off-CPU series told apart by their
    label, the pull endpoint answers type=off-cpu, and the metrics count the intervals."""
    program = subprocess.Popen([str(programs["sleep_poll_nofp"]), "120"])
    running.append(program)
    port, log, store = free_port(), tmp_path / "agent.log", tmp_path / "store"
    agent = start_strobe_run(tmp_path, log, port, "--off-cpu", store=store)
    base = f"http://127.0.0.1:{port}"
    try:
        sidecars = wait_for_off_cpu_sidecar(store, agent, log)
        token = (tmp_path / "cache" / "admin-token").read_text().strip()
        pulled = parse_pprof(
            fetch(f"{base}/debug/pprof/profile?seconds=2&type=off-cpu&pid={program.pid}", token)
        )
        metrics = fetch(f"{base}/metrics").decode()
    finally:
        stop_strobe_run(agent, log)

    labels = json.loads(sidecars[0].read_text())["labels"]
    assert labels["profile_type"] == "off-cpu"
    stored = parse_pprof(sidecars[0].with_suffix(".pb.gz").read_bytes())
    assert value_types(stored) == [("samples", "count"), ("off_cpu", "nanoseconds")]
    cpu_sidecars = [p for p in store.glob("*.json") if "profile_type" not in p.read_text()]
    assert cpu_sidecars, "the on-CPU series are still stored beside the off-CPU ones"
    assert value_types(pulled) == [("samples", "count"), ("off_cpu", "nanoseconds")]
    assert blocked_ns(pulled, "sleep_leaf") > 0.5e9, "2 s of a program asleep 60% of the time"
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith('strobe_off_cpu_events_total{outcome="counted"}')
    ]
    assert counted and float(counted[0].split()[-1]) > 0, metrics[-2000:]


def wait_for_off_cpu_sidecar(store: Path, agent: subprocess.Popen[bytes], log: Path) -> list[Path]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert agent.poll() is None, log.read_text()[-3000:]
        found = [p for p in store.glob("*.json") if '"profile_type": "off-cpu"' in p.read_text()]
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError("no off-CPU profile stored in 90 s: " + log.read_text()[-3000:])


PYTHON_WAITS = """
import os, select, sys, time
def nap():
    time.sleep(0.003)
def wait_pipe(r):
    select.select([r], [], [], 0.002)
def handler(r):
    nap()
    wait_pipe(r)
def main():
    r, w = os.pipe()
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        handler(r)
main()
"""


@pytest.mark.parametrize("version", ["3.12", "debian-3.11"])
def test_python_waits_show_the_python_functions(
    require_bpf: None,
    cache_dir: Path,
    running: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    version: str,
) -> None:
    """Blocked time of a CPython program lands on its Python functions (the off-CPU walk
    has the Python walker too): nap (a 3 ms sleep) 60%, wait_pipe (a 2 ms select) 40%."""
    script = tmp_path / "waits.py"
    script.write_text(PYTHON_WAITS)
    python = interpreter(version)
    program = subprocess.Popen([str(python), str(script), str(RECORD_SECONDS + 30)])
    running.append(program)
    time.sleep(1.0)  # past the interpreter's start-up
    profile = record_off_cpu(program.pid, tmp_path / "py.pb.gz", cache_dir)

    nap, wait = blocked_ns(profile, "nap"), blocked_ns(profile, "wait_pipe")
    total = sum(s.value[1] for s in profile.sample)
    assert nap + wait >= 0.8 * total, (nap, wait, total)
    assert 50 <= 100 * nap / (nap + wait) <= 70, (nap, wait)
    handled = sum(s.value[1] for s in profile.sample if "handler" in functions(profile, s))
    assert handled >= 0.8 * total, (handled, total)
