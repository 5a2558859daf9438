"""Table-driven user stacks against the real kernel: binaries without frame pointers.

One sampler per mode (99 Hz, every process) is compiled per module and shared; each
test drains first so it sees only its own window. A process's tables are loaded
synchronously (`unwind_tables.prepare`) before its samples are counted, so the
numbers measure the walker, not the race with the table builder.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.model import ProcessInfo, StackSample
from agent.process.cache import ProcessCache
from agent.process.reader import read_process
from agent.sampler import Sampler
from agent.sampler.convert import UNWIND_STATS
from agent.sampler.kernel_headers import find_kernel_headers
from agent.symbolize.symbolizer import Symbolizer
from agent.unwind.registry import resolve_binary
from tests.conftest import REPO, require_tool

FREQUENCY = 99
KERNEL_HALF = 0xFFFF800000000000
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: no frame pointers, .eh_frame, .dynsym only
CPU_BOUND = (
    "import time\n"
    "def fib(n):\n"
    "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "end = time.monotonic() + float(__import__('sys').argv[1])\n"
    "while time.monotonic() < end:\n"
    "    fib(18)\n"
)

pytestmark = pytest.mark.bpf


class _LazySamplers:
    """Compiled on first use, so require_bpf decides (skip/fail) before any BPF work."""

    def __init__(self) -> None:
        self.samplers: dict[str, Sampler] = {}

    def get(self, mode: str) -> Sampler:
        if mode not in self.samplers:
            sampler = Sampler(frequency=FREQUENCY, unwinder=mode)
            sampler.start()
            self.samplers[mode] = sampler
        return self.samplers[mode]


@pytest.fixture(scope="module")
def _shared() -> Iterator[_LazySamplers]:
    holder = _LazySamplers()
    yield holder
    for sampler in holder.samplers.values():
        sampler.close()


@pytest.fixture
def dwarf(require_bpf: None, _shared: _LazySamplers) -> Sampler:
    sampler = _shared.get("dwarf")
    sampler.drain()
    return sampler


@pytest.fixture
def fp(require_bpf: None, _shared: _LazySamplers) -> Sampler:
    sampler = _shared.get("fp")
    sampler.drain()
    return sampler


@pytest.fixture(scope="module")
def deep_nofp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """main -> level_1 .. level_6 -> leaf_spin, -O2 without frame pointers."""
    out = tmp_path_factory.mktemp("unwind_bpf") / "deep_nofp"
    source = REPO / "tests" / "data" / "c" / "deep_nofp.c"
    flags = ["-O2", "-fomit-frame-pointer", "-fasynchronous-unwind-tables"]
    subprocess.run([require_tool("gcc"), *flags, "-o", str(out), str(source)], check=True)
    return out


@pytest.fixture(scope="module")
def dlopen_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """dlopen_main, and the no-frame-pointer library it loads when told to."""
    out = tmp_path_factory.mktemp("unwind_dlopen")
    data, gcc = REPO / "tests" / "data" / "c", require_tool("gcc")
    flags = ["-O2", "-fomit-frame-pointer"]
    library, main = out / "libdeep_nofp.so", out / "dlopen_main"
    subprocess.run(
        [gcc, *flags, "-shared", "-fPIC", "-o", str(library), str(data / "libdeep_nofp.c")],
        check=True,
    )
    subprocess.run([gcc, *flags, "-o", str(main), str(data / "dlopen_main.c"), "-ldl"], check=True)
    return main, library


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def started(processes: list[subprocess.Popen[bytes]], argv: list[str]) -> ProcessInfo:
    """Start argv and capture it once its binary and libc are mapped."""
    proc = subprocess.Popen(argv)
    processes.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = read_process(proc.pid)
        if info is not None and any("libc.so" in m.path for m in info.mappings):
            return info
        time.sleep(0.01)
    raise AssertionError(f"{argv[0]} did not start")


def samples_of(
    sampler: Sampler, pid: int, enough: int = 120, timeout: float = 20.0
) -> list[StackSample]:
    """The pid's samples over drains, until `enough` (a busy machine gives fewer per second)."""
    samples: list[StackSample] = []
    deadline = time.monotonic() + timeout
    while sum(s.count for s in samples) < enough and time.monotonic() < deadline:
        time.sleep(0.5)
        samples += [s for s in sampler.drain().samples if s.pid == pid]
    return samples


def with_tables(sampler: Sampler, info: ProcessInfo, enough: int = 120) -> list[StackSample]:
    """Load the process's tables, then sample it."""
    tables = sampler.unwind_tables
    assert tables is not None
    assert tables.prepare(info) >= 2
    sampler.drain()  # drop samples taken before its tables were in place
    return samples_of(sampler, info.pid, enough)


def function_names(symbolizer: Symbolizer, info: ProcessInfo, stack: tuple[int, ...]) -> list[str]:
    return [
        location.frames[-1].function if location.frames else ""
        for location in symbolizer.symbolize(info, stack, ())
    ]


def reach_ratio(
    samples: list[StackSample], info: ProcessInfo, outermost: set[str]
) -> tuple[float, int]:
    """Share of samples whose user stack reaches one of `outermost`, and the total."""
    symbolizer = Symbolizer()
    total = sum(s.count for s in samples)
    reached = sum(
        s.count for s in samples if outermost & set(function_names(symbolizer, info, s.user_stack))
    )
    return (reached / total if total else 0.0), total


def test_no_frame_pointer_binary_reaches_main(
    dwarf: Sampler, deep_nofp: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    info = started(processes, [str(deep_nofp), "60"])
    samples = with_tables(dwarf, info)
    ratio, total = reach_ratio(samples, info, {"main"})
    assert total >= 100, samples
    assert ratio >= 0.95, (ratio, total)

    heaviest = max(samples, key=lambda s: s.count)
    names = function_names(Symbolizer(), info, heaviest.user_stack)
    chain = ["leaf_spin", "level_6", "level_5", "level_4", "level_3", "level_2", "level_1", "main"]
    assert names[: len(chain)] == chain, names
    stats = dwarf.unwind_stats()
    assert set(stats) == set(UNWIND_STATS)
    assert stats["table_frames"] >= 8 * total * 0.9
    assert stats["tail_call_failed"] == 0


def test_system_python_reaches_py_bytes_main(
    dwarf: Sampler, processes: list[subprocess.Popen[bytes]]
) -> None:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no /usr/bin/python3")
    info = started(processes, [SYSTEM_PYTHON, "-c", CPU_BOUND, "60"])
    samples = with_tables(dwarf, info)
    ratio, total = reach_ratio(samples, info, {"main", "Py_BytesMain"})
    assert total >= 100, samples
    assert ratio >= 0.90, (ratio, total)


def test_kernel_mode_samples_keep_kernel_stacks_and_walk_the_saved_user_registers(
    dwarf: Sampler, processes: list[subprocess.Popen[bytes]]
) -> None:
    reader = (
        "import os, time, sys\n"
        "fd = os.open('/dev/zero', os.O_RDONLY)\n"
        "end = time.monotonic() + float(sys.argv[1])\n"
        "while time.monotonic() < end:\n"
        "    os.read(fd, 65536)\n"
    )
    info = started(processes, [SYSTEM_PYTHON, "-c", reader, "60"])
    samples = with_tables(dwarf, info)
    in_kernel = [s for s in samples if s.kernel_stack]
    assert sum(s.count for s in in_kernel) >= 10, samples
    assert all(a >= KERNEL_HALF for s in in_kernel for a in s.kernel_stack)
    # The user half of a kernel-mode sample starts in the syscall wrapper and is walked
    # with tables from the registers saved at kernel entry.
    ratio, _ = reach_ratio(in_kernel, info, {"main", "Py_BytesMain"})
    assert ratio >= 0.8, ratio


def test_frame_pointer_mode_keeps_the_old_path(
    fp: Sampler, c_binaries: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    assert fp.unwind_mode == "fp" and fp.unwind_tables is None
    info = started(processes, [str(c_binaries / "spin_pie"), "60"])
    samples = samples_of(fp, info.pid, enough=60)
    ratio, total = reach_ratio(samples, info, {"main"})
    assert total >= 50 and ratio >= 0.9, (ratio, total)
    assert all(n == 0 for n in fp.unwind_stats().values())  # no walker in this mode


def test_tables_are_freed_when_the_process_is_gone(
    dwarf: Sampler, deep_nofp: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    tables = dwarf.unwind_tables
    assert tables is not None and dwarf.unwind_mode == "dwarf"
    tables.sweep()
    before = tables.stats()
    info = started(processes, [str(deep_nofp), "30"])
    tables.prepare(info)
    during = tables.stats()
    assert during.processes == before.processes + 1
    # deep_nofp's table is new, or an idle one (left by an earlier test) is in use again
    assert during.rows_used > before.rows_used or during.idle_tables < before.idle_tables
    processes[-1].kill()
    processes[-1].wait(timeout=10)
    assert tables.sweep() >= 1
    idle = tables.stats()
    assert idle.processes == before.processes
    assert idle.idle_tables > during.idle_tables  # kept a while, in case it runs again
    assert idle.rows_used == during.rows_used
    # An hour later (the idle time is ten minutes) the sweep frees the rows.
    real_clock = tables._clock
    tables._clock = lambda: real_clock() + 3600
    try:
        tables.sweep()
    finally:
        tables._clock = real_clock
    after = tables.stats()
    assert after.idle_tables == 0 and after.rows_used < during.rows_used


def test_prepare_unwind_queues_for_the_worker(
    dwarf: Sampler, deep_nofp: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    info = started(processes, [str(deep_nofp), "60"])
    dwarf.prepare_unwind(info)
    assert dwarf.wait_unwind_ready(timeout=60)
    dwarf.drain()  # drop the ticks taken while the worker was still building tables
    samples = samples_of(dwarf, info.pid, enough=60)
    ratio, total = reach_ratio(samples, info, {"main"})
    assert total >= 50 and ratio >= 0.9, (ratio, total)


def test_code_loaded_later_gets_its_table_from_an_unknown_mapping_event(
    dwarf: Sampler, dlopen_pair: tuple[Path, Path], processes: list[subprocess.Popen[bytes]]
) -> None:
    main, library = dlopen_pair
    proc = subprocess.Popen([str(main), str(library), "60"], stdin=subprocess.PIPE)
    processes.append(proc)
    info = None
    deadline = time.monotonic() + 10
    while info is None or not any("libc.so" in m.path for m in info.mappings):
        assert time.monotonic() < deadline, "dlopen_main did not start"
        info = read_process(proc.pid)
    # Handle pending pid events (this exec among them) first, so that only the
    # walker's unknown-mapping event can bring the library's table.
    dwarf.poll_new_processes()
    assert dwarf.wait_unwind_ready(timeout=120)
    tables = dwarf.unwind_tables
    assert tables is not None and tables.prepare(info) >= 2  # before the library is loaded
    dwarf.drain()
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()

    time.sleep(1.0)
    loaded = read_process(proc.pid)
    assert loaded is not None
    before = [s for s in dwarf.drain().samples if s.pid == proc.pid]
    assert reach_ratio(before, loaded, {"main"})[0] < 0.5  # no table for the library yet

    deadline = time.monotonic() + 60
    reached: list[float] = []
    while time.monotonic() < deadline and (not reached or reached[-1] < 0.9):
        dwarf.poll_new_processes(timeout_ms=200)  # hands the unknown-mapping event to the worker
        dwarf.wait_unwind_ready(timeout=60)
        samples = [s for s in dwarf.drain().samples if s.pid == proc.pid]
        if samples:
            reached.append(reach_ratio(samples, loaded, {"main"})[0])
    assert reached and reached[-1] >= 0.9, reached
    mapping = next(m for m in loaded.mappings if m.path == str(library))
    source = resolve_binary(proc.pid, mapping)
    assert source is not None and proc.pid in tables.table_users(source.key)
    names = function_names(Symbolizer(), loaded, max(samples, key=lambda s: s.count).user_stack)
    assert names[:5] == ["lib_spin", "lib_middle", "lib_entry", "run", "main"], names


def test_bad_unwinder_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Sampler(unwinder="lbr")
    with pytest.raises(ValueError):
        Sampler(unwind_table_rows=0)


def build_rust_release(directory: Path) -> Path:
    """tests/symbolize/data/work.rs as `rustc -O` builds it: lld-linked, no frame pointers."""
    binary = directory / "work"
    source = REPO / "tests" / "symbolize" / "data" / "work.rs"
    subprocess.run([require_tool("rustc"), "-O", "-o", str(binary), str(source)], check=True)
    return binary


def build_go(directory: Path) -> Path:
    """tests/data/go/spin.go with `go build`'s defaults (Debian's Go, offline)."""
    binary = directory / "spin"
    env = {**os.environ, "GOCACHE": str(directory / "gocache"), "GO111MODULE": "off"}
    env["GOPROXY"] = "off"
    source = REPO / "tests" / "data" / "go" / "spin.go"
    subprocess.run(
        [require_tool("go"), "build", "-o", str(binary), str(source)], check=True, env=env
    )
    return binary


def first_window(sampler: Sampler, argv: list[str], seconds: float = 10.0) -> list[StackSample]:
    """Start argv under a running sampler and keep its first window (the agent's default
    10 s), with tables made only the agent's way: from pid events (exec, first sample,
    code not routed yet), by the worker. A binary never seen before has its leaf-only
    stacks while its table is parsed (~0.25 s for Debian's python3.11: 2.5% of the
    window at 99 Hz); one whose table is loaded costs a route: none are cut."""
    sampler.poll_new_processes()
    sampler.drain()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    samples: list[StackSample] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sampler.poll_new_processes(timeout_ms=20)  # as the daemon's loop does
        captured = read_process(proc.pid)
        samples = [s for s in sampler.drain().samples if s.pid == proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert captured is not None
    samples_info[proc.pid] = captured
    return samples


samples_info: dict[int, ProcessInfo] = {}


@pytest.mark.parametrize("program", ["c-no-frame-pointers", "debian-python3", "rust", "go"])
def test_stacks_are_whole_from_the_first_window(
    dwarf: Sampler, deep_nofp: Path, tmp_path: Path, program: str
) -> None:
    argv, outermost = {
        "c-no-frame-pointers": (lambda: [str(deep_nofp), "30"], {"main"}),
        "debian-python3": (lambda: [SYSTEM_PYTHON, "-c", CPU_BOUND, "30"], {"Py_BytesMain"}),
        "rust": (lambda: [str(build_rust_release(tmp_path)), "100000000"], {"main"}),
        "go": (lambda: [str(build_go(tmp_path)), "30"], {"main.main"}),
    }[program]
    samples = first_window(dwarf, argv())
    info = samples_info[samples[0].pid] if samples else None
    assert info is not None, "no samples of the program"
    ratio, total = reach_ratio(samples, info, outermost)
    assert total >= 100, total  # fewer on a busy machine: the ratio is what counts
    assert ratio >= 0.95, (program, ratio, total)


def longest_unnamed_run(names: list[str], addresses: tuple[int, ...] = ()) -> int:
    """Frames in the longest unnamed run; with `addresses`, a frame repeating the one
    before it (recursion) does not lengthen the run."""
    longest = run = 0
    for index, name in enumerate(names):
        repeat = bool(addresses) and index > 0 and addresses[index] == addresses[index - 1]
        run = 0 if name else run if repeat else run + 1
        longest = max(longest, run)
    return longest


def test_a_refused_table_ends_stacks_cleanly_instead_of_guessing(
    require_bpf: None, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Rows for libc but not for Debian's python3.11 (58k rows, no frame pointers): its
    stacks stop at the python frame instead of following rbp into junk (before: one
    real frame and up to 126 of garbage such as 0x6), and the metric says why."""
    with Sampler(frequency=FREQUENCY, unwinder="dwarf", unwind_table_rows=40_000) as sampler:
        sampler.start()
        info = started(processes, [SYSTEM_PYTHON, "-c", CPU_BOUND, "60"])
        tables = sampler.unwind_tables
        assert tables is not None
        tables.prepare(info)
        assert tables.stats().failed_binaries >= 1  # python3.11 did not fit
        sampler.drain()
        sampler.unwind_stats()
        samples = samples_of(sampler, info.pid, enough=100)
        symbolizer = Symbolizer()
        runs = [
            longest_unnamed_run(function_names(symbolizer, info, s.user_stack)) for s in samples
        ]
        assert sum(s.count for s in samples) >= 100
        assert max(runs) < 3, runs
        assert max(len(s.user_stack) for s in samples) <= 8
        assert sampler.unwind_stats()["no_table"] > 0


LLVM = re.compile(r"/lib(clang-cpp|LLVM)[^/]*\.so")
BCC_COMPILES = (
    "import sys, time\n"
    "from bcc import BPF\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    BPF(text='int f(void *ctx) { return 0; }').cleanup()\n"
)


def test_a_whole_host_profile_while_bcc_compiles_has_no_junk_stacks(
    dwarf: Sampler, processes: list[subprocess.Popen[bytes]]
) -> None:
    """bcc's compiles run libclang-cpp and libLLVM (1.7M rows together, no frame
    pointers) on Debian's python3: whatever fits the rows gets tables, the rest ends
    stacks. The frame-pointer guess made 127-frame towers of junk there, so no frame
    may lie outside the process's code, and no run of unnamed frames may pass 16
    distinct addresses (a recursive unnamed function, such as libbcc's symbol tree
    walk, legitimately repeats one return address many times)."""
    cache = ProcessCache()
    env = os.environ | find_kernel_headers().bcc_environment()  # as the agent's compile has
    compiler = subprocess.Popen([SYSTEM_PYTHON, "-c", BCC_COMPILES, "8"], env=env)
    processes.append(compiler)
    end = time.monotonic() + 8
    while time.monotonic() < end:
        for new in dwarf.poll_new_processes(timeout_ms=50):  # as the daemon's loop does
            cache.capture(new.pid, reread=new.reread)
    window = dwarf.drain()
    assert compiler.wait(timeout=60) == 0, "the bcc compiles failed"
    symbolizer = Symbolizer()
    runs = []
    for sample in window.samples:
        process = cache.get_covering(sample.pid, sample.user_stack)
        if sample.pid != compiler.pid or process is None:
            continue  # elsewhere, a stripped program's frames may well be unnamed
        if sample.comm != process.comm:
            continue  # a tick between fork and exec: the test runner's image, not python3's
        names = function_names(symbolizer, process, sample.user_stack)
        outside = [a for a in sample.user_stack if not any(m.contains(a) for m in process.mappings)]
        distinct = longest_unnamed_run(names, sample.user_stack)
        runs.append((distinct, len(outside), sample.comm, len(sample.user_stack)))
    assert len(runs) >= 10, "too few samples of bcc compiling"
    assert max(r[1] for r in runs) == 0, sorted(runs, key=lambda r: -r[1])[:5]
    assert max(runs)[0] < 16, sorted(runs, reverse=True)[:5]
    final = cache.get(compiler.pid)
    assert final is not None and any(LLVM.search(m.path) for m in final.mappings)
