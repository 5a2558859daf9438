"""The sampler against the real kernel: real processes, real perf events, real maps.

One sampler (99 Hz, every process) is compiled per user-stack mode (frame pointers,
and tables with frame-pointer fallback) and shared; each test drains it first so it
sees only its own window. Sample counts are checked against
the CPU time the kernel accounted to the process (/proc/PID/stat of the zombie),
which bounds both losses and double counting without timing assumptions.
"""

from __future__ import annotations

import bisect
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent import metrics
from agent.model import StackSample, Window
from agent.sampler import Sampler
from agent.sampler.bpf_syscalls import enable_run_time_stats
from agent.sampler.convert import SAMPLE_LOSS_REASONS, NewProcess
from agent.sampler.kernel_headers import running_kernel_headers
from tests.conftest import metric_value

FREQUENCY = 99
CLK_TCK = os.sysconf("SC_CLK_TCK")
KERNEL_HALF = 0xFFFF800000000000

pytestmark = pytest.mark.bpf


class _LazySampler:
    """Compiled on first use, so require_bpf decides (skip/fail) before any BPF work."""

    def __init__(self, unwinder: str) -> None:
        self.unwinder = unwinder
        self.sampler: Sampler | None = None

    def get(self) -> Sampler:
        if self.sampler is None:
            self.sampler = Sampler(frequency=FREQUENCY, unwinder=self.unwinder)
            self.sampler.start()
        return self.sampler


@pytest.fixture(scope="module", params=["fp", "dwarf"])
def _shared_sampler(request: pytest.FixtureRequest) -> Iterator[_LazySampler]:
    holder = _LazySampler(request.param)
    yield holder
    if holder.sampler is not None:
        holder.sampler.close()


@pytest.fixture
def sampler(require_bpf: None, _shared_sampler: _LazySampler) -> Sampler:
    shared = _shared_sampler.get()
    shared.drain()  # start from an empty window
    shared.poll_new_processes()
    return shared


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_cpu_seconds(proc: subprocess.Popen[bytes], timeout: float = 30) -> float:
    """Wait for exit without reaping, read the CPU time the kernel accounted, then reap."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # stat fields 14 and 15
    proc.wait(timeout=timeout)
    return (utime + stime) / CLK_TCK


def serve_pid_events(sampler: Sampler, seconds: float) -> None:
    """Hand pid events to the unwind worker for `seconds`, as the agent's loop does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sampler.poll_new_processes(timeout_ms=20)


def exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child exited, leaving it unreaped (a zombie) for wait_cpu_seconds."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def of_pid(window: Window, pid: int) -> list[StackSample]:
    return [s for s in window.samples if s.pid == pid]


def function_ranges(binary: Path, names: set[str]) -> dict[str, tuple[int, int]]:
    with binary.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        return {
            sym.name: (sym["st_value"], sym["st_value"] + sym["st_size"])
            for sym in symtab.iter_symbols()
            if sym.name in names
        }


def load_base(pid: int, binary: Path) -> int:
    """Where the PIE binary's first segment (file offset 0, vaddr 0) is mapped."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(binary) and int(parts[2], 16) == 0:
            return int(parts[0].split("-")[0], 16)
    raise AssertionError(f"{binary} not mapped in {pid}")


def test_spinning_process_is_sampled_with_its_call_chain(
    sampler: Sampler, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    binary = c_binaries / "spin_pie"
    proc = subprocess.Popen([str(binary), "3"])
    processes.append(proc)
    serve_pid_events(sampler, 0.5)  # as the agent's loop does: tables come from them
    base = load_base(proc.pid, binary)
    cpu_seconds = wait_cpu_seconds(proc)

    window = sampler.drain()  # drained after the process exited: its samples are kept
    samples = of_pid(window, proc.pid)
    total = sum(s.count for s in samples)
    expected = FREQUENCY * cpu_seconds
    assert cpu_seconds > 0.75, "the workload did not get the CPU"
    assert 0.5 * expected < total <= 1.2 * expected + 5, (total, expected)
    assert {s.comm for s in samples} == {"spin_pie"}
    assert all(s.tid == proc.pid for s in samples)

    # Innermost first: inner_spin <- outer_function <- main, as frame pointers give them.
    chain = ("inner_spin", "outer_function", "main")
    ranges = function_ranges(binary, set(chain))
    in_function = [
        s.count
        for s in samples
        if len(s.user_stack) >= 3
        and all(
            ranges[name][0] <= address - base < ranges[name][1]
            for name, address in zip(chain, s.user_stack[:3], strict=True)
        )
    ]
    assert sum(in_function) > 0.8 * total, [s.user_stack for s in samples[:5]]
    assert window.end_ns > window.start_ns


def test_a_full_counts_map_drops_samples_and_counts_the_reason(
    require_bpf: None, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """A counts map with room for 2 keys and 4 busy processes (a key each at least): the
    samples that find no room are dropped in BPF and counted as counts_map_full, in the
    window and in strobe_samples_lost."""
    exported = metric_value(metrics.SAMPLES_LOST, reason="counts_map_full")
    lost: list[dict[str, int]] = []
    keys: list[int] = []
    with Sampler(frequency=FREQUENCY, unwinder="fp", counts_entries=2) as small:
        small.start()
        small.drain()
        processes += [subprocess.Popen([str(c_binaries / "spin_pie"), "30"]) for _ in range(4)]
        deadline = time.monotonic() + 30
        while sum(w["counts_map_full"] for w in lost) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)  # a poll: the loop ends on the count, not on the time
            window = small.drain()
            lost.append(window.lost)
            keys.append(len(window.samples))
    assert all(set(w) == set(SAMPLE_LOSS_REASONS) for w in lost), lost
    full = sum(w["counts_map_full"] for w in lost)
    assert full >= 20, lost
    assert max(keys) <= 2, keys  # what was kept fit the map
    exported = metric_value(metrics.SAMPLES_LOST, reason="counts_map_full") - exported
    assert exported == full


def test_a_full_stack_map_keeps_the_samples_and_counts_the_collisions(
    require_bpf: None, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """A stack map of one bucket and 4 busy PIE processes (each its own stack addresses):
    a user stack whose bucket another stack holds is counted as user_stack_collision, in
    the window and in strobe_samples_lost, and its sample is kept without the stack."""
    exported = metric_value(metrics.SAMPLES_LOST, reason="user_stack_collision")
    windows: list[Window] = []
    with Sampler(frequency=FREQUENCY, unwinder="fp", stack_entries=1) as small:
        small.start()
        small.drain()
        busy = [subprocess.Popen([str(c_binaries / "spin_pie"), "30"]) for _ in range(4)]
        processes += busy
        deadline = time.monotonic() + 30
        while (
            sum(w.lost["user_stack_collision"] for w in windows) < 20
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)  # a poll: the loop ends on the count, not on the time
            windows.append(small.drain())
    collisions = sum(w.lost["user_stack_collision"] for w in windows)
    assert collisions >= 20, [w.lost for w in windows]
    pids = {proc.pid for proc in busy}
    kept = [s for w in windows for s in w.samples if s.pid in pids and not s.user_stack]
    assert sum(s.count for s in kept) > 0, "samples without their user stack are dropped"
    exported = metric_value(metrics.SAMPLES_LOST, reason="user_stack_collision") - exported
    assert exported == collisions


def test_syscall_heavy_process_has_kernel_stacks(
    sampler: Sampler, processes: list[subprocess.Popen[bytes]]
) -> None:
    reader = (
        "import os, time\n"
        "fd = os.open('/dev/zero', os.O_RDONLY)\n"
        "end = time.process_time() + 1.5\n"  # CPU seconds: a busy machine still gives 1.5
        "while time.process_time() < end:\n"
        "    os.read(fd, 1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", reader])
    processes.append(proc)
    wait_cpu_seconds(proc)

    samples = of_pid(sampler.drain(), proc.pid)
    with_kernel = [s for s in samples if s.kernel_stack]
    assert sum(s.count for s in with_kernel) >= 5, samples
    assert all(address >= KERNEL_HALF for s in with_kernel for address in s.kernel_stack)
    names = kernel_symbols({a for s in with_kernel for a in s.kernel_stack})
    assert any("syscall" in name.lower() for name in names), names


def kernel_symbols(addresses: set[int]) -> set[str]:
    """Names of the kallsyms functions containing `addresses` (root sees real addresses)."""
    symbols = sorted(
        (int(line.split()[0], 16), line.split()[2])
        for line in Path("/proc/kallsyms").read_text().splitlines()
        if line.split()[1] in "tT"
    )
    starts = [start for start, _ in symbols]
    return {symbols[bisect.bisect_right(starts, a) - 1][1] for a in addresses}


def test_drains_split_samples_between_windows_without_double_counting(
    sampler: Sampler, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen([str(c_binaries / "spin_pie"), "2"])
    processes.append(proc)
    windows = []
    while not exited(proc):  # drain while samples keep arriving
        time.sleep(0.2)
        windows.append(sampler.drain())
    cpu_seconds = wait_cpu_seconds(proc)
    windows.append(sampler.drain())
    after_exit = sampler.drain()

    per_window = [sum(s.count for s in of_pid(w, proc.pid)) for w in windows]
    expected = FREQUENCY * cpu_seconds
    assert sum(1 for n in per_window if n > 0) >= 3, per_window
    assert 0.5 * expected < sum(per_window) <= 1.2 * expected + 5, (per_window, expected)
    assert of_pid(after_exit, proc.pid) == []  # drained entries were deleted, not re-reported
    for earlier, later in zip(windows, windows[1:], strict=False):
        assert later.start_ns == earlier.end_ns  # windows tile time


def test_poll_new_processes_reports_short_lived_exec(
    sampler: Sampler, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen([str(c_binaries / "spin_pie"), "0.3"])
    processes.append(proc)
    # The exec is reported as such, so the process cache reads the new image even
    # when it captured the forked child before its exec (whose first sample, if the
    # tick caught it between fork and exec, may come in an earlier poll).
    exec_reported = NewProcess(proc.pid, reread=True)
    assert exec_reported in poll_until(sampler, proc.pid, wanted=exec_reported)


def test_poll_new_processes_reports_forked_child_on_first_sample(
    sampler: Sampler, processes: list[subprocess.Popen[bytes]]
) -> None:
    # The child never execs: only its first sample can announce it.
    forker = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    end = time.monotonic() + 0.5\n"
        "    while time.monotonic() < end: pass\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "os.waitpid(pid, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", forker], stdout=subprocess.PIPE)
    processes.append(proc)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert NewProcess(child, reread=False) in poll_until(sampler, child)


def poll_until(
    sampler: Sampler, pid: int, timeout: float = 10, wanted: NewProcess | None = None
) -> list[NewProcess]:
    """New processes polled until pid shows up (or `wanted` does, when given)."""
    seen: list[NewProcess] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (wanted in seen) if wanted is not None else pid in {new.pid for new in seen}:
            break
        seen += sampler.poll_new_processes(timeout_ms=100)
    return seen


def test_pid_filter_sees_only_that_pid(
    require_bpf: None, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    target = subprocess.Popen([str(c_binaries / "spin_pie"), "30"])
    other = subprocess.Popen([str(c_binaries / "spin_nopie"), "30"])
    processes += [target, other]
    with Sampler(frequency=FREQUENCY, pid=target.pid) as filtered:
        filtered.start()
        samples: list[StackSample] = []
        deadline = time.monotonic() + 30  # a busy machine gives the target less CPU
        while sum(s.count for s in samples) <= 10 and time.monotonic() < deadline:
            time.sleep(0.5)
            samples += filtered.drain().samples
        announced = {new.pid for new in filtered.poll_new_processes()}
    assert {s.pid for s in samples} == {target.pid}
    assert sum(s.count for s in samples) > 10
    assert announced <= {target.pid}
    # Closed by the with block: closing again is fine, draining is refused.
    filtered.close()
    assert filtered.poll_new_processes() == []
    with pytest.raises(RuntimeError):
        filtered.drain()


def test_unstarted_sampler_refuses_drain_and_closes() -> None:
    sampler = Sampler(frequency=FREQUENCY)
    with pytest.raises(RuntimeError):
        sampler.drain()
    assert sampler.poll_new_processes() == []
    sampler.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Sampler(frequency=0)
    with pytest.raises(ValueError):
        Sampler(pid=-3)


def test_distro_headers_are_merged_under_the_configured_cache_dir(
    require_bpf: None, tmp_path: Path
) -> None:
    """--cache-dir holds the merged header tree when the running kernel has no headers."""
    own_headers = running_kernel_headers(Path("/"), platform.release()) is not None
    with Sampler(frequency=FREQUENCY, pid=os.getpid(), cache_dir=tmp_path) as sampler:
        sampler.start()
    merged = list((tmp_path / "kernel-headers").glob("linux-headers-*"))
    if own_headers:  # bcc uses /lib/modules/$(uname -r)/build: nothing to merge
        assert merged == []
    else:
        assert len(merged) == 1 and (merged[0] / "include").is_dir(), merged


def test_run_stats_and_map_memory_come_from_the_kernel(
    sampler: Sampler, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Program run counts (while stats are enabled) and map memory, read by syscalls."""
    stats_fd = enable_run_time_stats()
    try:
        before = sampler.bpf_run_stats()["on_cpu_clock"]
        proc = subprocess.Popen([str(c_binaries / "spin_pie"), "0.5"])
        processes.append(proc)
        wait_cpu_seconds(proc)
        after = sampler.bpf_run_stats()["on_cpu_clock"]
    finally:
        os.close(stats_fd)
    runs, nanoseconds = after[1] - before[1], after[0] - before[0]
    assert runs >= 0.5 * FREQUENCY * 0.5, (before, after)  # at least every spin tick ran it
    assert 0 < nanoseconds < runs * 1_000_000  # under 1 ms a run
    memory = sampler.bpf_map_memory()
    assert memory["counts"] > 0 and memory["stacks0"] > 0, memory
    if sampler.unwind_mode == "dwarf":
        assert memory["unwind_rows"] >= 8 * 1_000_000, memory
