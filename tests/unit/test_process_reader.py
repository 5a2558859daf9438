"""read_process and ProcessCache against real processes (and a fake /proc for pid reuse)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.metrics import PROCESS_READ_ERRORS, PROCESSES_SEEN
from agent.process import reader
from agent.process.cache import ProcessCache
from agent.process.reader import read_process
from tests.conftest import metric_value
from tests.symbolize.helpers import exited_pid, running


def test_reads_this_process() -> None:
    info = read_process(os.getpid())
    assert info is not None
    assert info.pid == os.getpid()
    assert info.exe == os.path.realpath(sys.executable)
    assert info.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert info.start_time > 0
    assert any("pytest" in arg for arg in info.cmdline)
    assert info.mappings, "a running interpreter maps executable code"
    assert all("x" in m.perms for m in info.mappings)
    assert any(m.path == info.exe for m in info.mappings)
    assert [m.start for m in info.mappings] == sorted(m.start for m in info.mappings)


def test_exited_process_gives_none_and_counts_vanished() -> None:
    before = metric_value(PROCESS_READ_ERRORS, reason="vanished")
    assert read_process(exited_pid()) is None
    assert metric_value(PROCESS_READ_ERRORS, reason="vanished") == before + 1


def test_kernel_thread_has_no_mappings() -> None:
    info = read_process(2)  # kthreadd
    if info is None:
        pytest.skip("pid 2 is not visible in this pid namespace")
    assert info.mappings == () and info.exe == ""


def test_a_child_process_exe_and_start_time(c_binaries: Path) -> None:
    binary = c_binaries / "spin_pie"
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        info = read_process(pid)
        assert info is not None
        assert info.exe == str(binary) and info.comm == "spin_pie"
        assert info.cmdline == (str(binary), "60")
        assert any(m.path == str(binary) for m in info.mappings)
        own = read_process(os.getpid())
        assert own is not None and info.start_time >= own.start_time


def spawn_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A new `sleep` under `pid` (just freed), or None when the kernel gave another
    pid (needs root to steer the pid allocator)."""
    for _ in range(20):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(["sleep", "60"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait(timeout=10)
    return None


def test_a_process_that_exits_mid_read_is_not_captured_even_if_its_pid_is_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stat and exe are read, then the process exits and another takes its pid before
    maps is read: the capture must not mix the two (it reads through one /proc/PID
    directory, bound to the first process)."""
    first = subprocess.Popen(["sleep", "60"])
    successors: list[subprocess.Popen[bytes] | None] = []
    real_read_exe = reader.read_exe

    def exit_after_exe(directory: int) -> str:
        exe = real_read_exe(directory)
        first.kill()
        first.wait(timeout=10)
        successors.append(spawn_with_pid(first.pid))
        return exe

    monkeypatch.setattr(reader, "read_exe", exit_after_exe)
    before = metric_value(PROCESS_READ_ERRORS, reason="vanished")
    try:
        assert read_process(first.pid) is None
        assert metric_value(PROCESS_READ_ERRORS, reason="vanished") == before + 1
    finally:
        for successor in successors:
            if successor is not None:
                successor.kill()
                successor.wait(timeout=10)
    if successors[0] is None:
        pytest.skip("could not give the pid to a new process (needs root): exit tested only")


def fake_proc(root: Path, pid: int, start_time: int, comm: str, maps: str) -> None:
    """A /proc/PID directory with the files read_process reads."""
    directory = root / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    fields = " ".join(["S"] + ["0"] * 18 + [str(start_time), "0", "0"])
    (directory / "stat").write_text(f"{pid} ({comm}) {fields}\n")
    (directory / "maps").write_text(maps)
    (directory / "cmdline").write_text(f"{comm}\0")


MAPS_A = "1000-2000 r-xp 00000000 fe:00 11 /bin/a\n"
MAPS_B = "1000-2000 r-xp 00000000 fe:00 22 /bin/b\n"


def test_cache_reads_once_per_pid_and_start_time(tmp_path: Path) -> None:
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    seen = metric_value(PROCESSES_SEEN)
    first = cache.capture(7)
    assert first is not None and first.mappings[0].path == "/bin/a"
    (tmp_path / "7" / "maps").write_text(MAPS_B)  # same process: no re-read
    assert cache.capture(7) is first
    assert cache.get(7) is first
    assert metric_value(PROCESSES_SEEN) == seen + 1


def test_cache_rereads_a_reused_pid(tmp_path: Path) -> None:
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    assert cache.capture(7) is not None
    fake_proc(tmp_path, 7, 250, "b", MAPS_B)  # a new process got pid 7
    info = cache.capture(7)
    assert info is not None
    assert (info.comm, info.start_time, info.mappings[0].path) == ("b", 250, "/bin/b")


def test_cache_rereads_after_an_exec_only_when_asked(tmp_path: Path) -> None:
    # A vfork child sampled before its exec was captured with its parent's image; the
    # exec keeps pid and start time, so only the exec event can say the image changed.
    fake_proc(tmp_path, 7, 100, "python3", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    before = cache.capture(7)
    fake_proc(tmp_path, 7, 100, "b", MAPS_B)
    assert cache.capture(7) is before
    after = cache.capture(7, reread=True)
    assert after is not None and after is not before
    assert (after.comm, after.mappings[0].path) == ("b", "/bin/b")
    assert cache.get(7) is after


def test_exited_process_is_kept_until_a_window_used_it(tmp_path: Path) -> None:
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path, grace_windows=2)
    assert cache.capture(7) is not None
    for path in (tmp_path / "7").iterdir():
        path.unlink()
    (tmp_path / "7").rmdir()  # the process exited before the drain
    info = cache.get(7)  # the drain still attributes its samples
    assert info is not None and info.comm == "a"
    cache.end_window()  # used in this window and gone: forgotten
    assert len(cache) == 0
    assert cache.get(7) is None


def test_exited_unused_process_is_forgotten_after_grace(tmp_path: Path) -> None:
    fake_proc(tmp_path, 8, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path, grace_windows=1)
    assert cache.capture(8) is not None
    (tmp_path / "8" / "stat").unlink()
    cache.end_window()
    assert len(cache) == 1  # not used yet: samples may still come
    cache.end_window()
    assert len(cache) == 0


def test_live_processes_survive_windows(tmp_path: Path) -> None:
    fake_proc(tmp_path, 9, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    assert cache.get(9) is not None
    for _ in range(5):
        cache.end_window()
    assert len(cache) == 1


def test_cache_is_bounded_lru(tmp_path: Path) -> None:
    for pid in range(10, 15):
        fake_proc(tmp_path, pid, 100, f"p{pid}", MAPS_A)
    cache = ProcessCache(max_entries=3, proc=tmp_path)
    for pid in range(10, 14):
        cache.capture(pid)
    assert len(cache) == 3
    cache.get(11)  # most recently used now
    cache.capture(14)
    assert cache.get(11) is not None and len(cache) == 3
    (tmp_path / "10" / "stat").unlink()
    assert cache.get(10) is None  # evicted first, and now unreadable


def test_get_covering_refreshes_at_most_once_per_window(tmp_path: Path) -> None:
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    assert cache.get_covering(7, [0x1800]) is not None
    fake_proc(tmp_path, 7, 100, "a", MAPS_A + "3000-4000 r-xp 00000000 fe:00 33 /lib/new\n")
    info = cache.get_covering(7, [0x3800])  # outside known mappings: re-read maps
    assert info is not None and len(info.mappings) == 2
    fake_proc(tmp_path, 7, 100, "a", MAPS_A + "5000-6000 r-xp 00000000 fe:00 44 /lib/c\n")
    info = cache.get_covering(7, [0x5800])  # same window: no second re-read
    assert info is not None and [m.path for m in info.mappings] == ["/bin/a", "/lib/new"]
    cache.end_window()
    info = cache.get_covering(7, [0x5800])
    assert info is not None and info.mappings[-1].path == "/lib/c"


def test_real_process_captured_then_killed_is_still_attributed(c_binaries: Path) -> None:
    binary = c_binaries / "spin_nopie"
    cache = ProcessCache()
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        assert cache.capture(pid) is not None
    # the context manager killed and reaped it
    info = cache.get(pid)
    assert info is not None and info.comm == "spin_nopie"
    cache.end_window()
    if Path(f"/proc/{pid}").exists():
        pytest.skip("pid was reused by another process meanwhile")
    assert cache.get(pid) is None


def test_capture_live_gives_nothing_for_a_gone_process_that_capture_still_remembers(
    tmp_path: Path,
) -> None:
    """The pipeline hands only live captures on (unwind tables, Python): a process gone
    before its exec event was read costs nothing more, but its samples keep the last
    capture."""
    fake_proc(tmp_path, 7, 100, "a", MAPS_A)
    cache = ProcessCache(proc=tmp_path)
    first = cache.capture_live(7)
    assert first is not None
    assert cache.capture_live(7) is first  # known and running: the same capture
    (tmp_path / "7" / "stat").unlink()  # exited (after an exec: a reread is asked)
    assert cache.capture_live(7, reread=True) is None
    assert cache.capture_live(7) is None
    assert cache.capture(7, reread=True) is first
    assert cache.capture_live(8) is None and cache.capture(8) is None
