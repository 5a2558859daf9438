"""Short-lived processes against the real kernel: ten 0.3 s CPU burners run one after
the other (alone, and beside 300 execs/s of /bin/true); the agent's capture step
(Pipeline.capture_new_processes: sampler ring buffer -> ProcessCache.capture ->
BackgroundIndexer.watch) captures each one at its first sample; the window is drained
only after all of them have exited, and every one of their samples must still come out
symbolized with the test binary's functions.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.labels.guard import CardinalityGuard
from agent.labels.labeler import Labeler
from agent.model import StackSample, Window
from agent.pipeline import Pipeline, labeled_series
from agent.process.cache import ProcessCache
from agent.sampler import Sampler
from agent.symbolize.background_indexer import BackgroundIndexer
from agent.symbolize.symbolizer import Symbolizer
from agent.window_flow import Stages

pytestmark = pytest.mark.bpf

RUNS = 10
SECONDS = "0.3"
BINARY_FUNCTIONS = {"inner_spin", "outer_function", "main"}


def defined_functions(binary: Path) -> set[str]:
    """Every function the binary defines (its own and the C runtime's, such as _start)."""
    with binary.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        return {
            s.name
            for s in symtab.iter_symbols()
            if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] != "SHN_UNDEF"
        }


def capture_until(stop: threading.Event, pipeline: Pipeline) -> None:
    while not stop.is_set():
        pipeline.capture_new_processes(timeout_ms=50)


@dataclass
class Captured:
    """What the agent's composition knew after the runs: the window and its process cache."""

    pids: list[int]
    window: Window
    processes: ProcessCache
    symbolizer: Symbolizer


@contextmanager
def sample_runs(commands: list[list[str]], cache_dir: Path) -> Iterator[Captured]:
    """Run each command to its end while sampling; drain once they have all exited."""
    sampler = Sampler(frequency=99)
    processes = ProcessCache()
    symbolizer = Symbolizer(cache_dir=cache_dir)
    indexer = BackgroundIndexer(symbolizer, interval=0.5)
    labeler, guard = Labeler("test-node"), CardinalityGuard(100)
    # The agent's own capture step (Pipeline.capture_new_processes), on its own thread.
    pipeline = Pipeline(
        sampler=sampler,
        processes=processes,
        symbolizer=symbolizer,
        stages=Stages(processes.get_covering, symbolizer.symbolize, labeled_series(labeler, guard)),
        period_ns=10**9 // 99,
        guard=guard,
        labeler=labeler,
        indexer=indexer,
    )
    stop = threading.Event()
    capturer = threading.Thread(target=capture_until, args=(stop, pipeline), daemon=True)
    pids: list[int] = []
    try:
        sampler.start()
        sampler.drain()
        indexer.start()
        capturer.start()
        for command in commands:
            child = subprocess.Popen(command)
            pids.append(child.pid)
            assert child.wait(timeout=60) == 0
        stop.set()
        capturer.join(timeout=30)
        window = sampler.drain()  # every process has exited by now
    finally:
        stop.set()
        indexer.stop()
        sampler.close()
    try:
        yield Captured(pids, window, processes, symbolizer)
    finally:
        symbolizer.close()


def samples_by_pid(captured: Captured) -> dict[int, list[StackSample]]:
    ours: dict[int, list[StackSample]] = defaultdict(list)
    for sample in captured.window.samples:
        if sample.pid in captured.pids:
            ours[sample.pid].append(sample)
    return ours


CHURN = """
import os, signal, sys, time
rate, count, stopped = int(sys.argv[1]), 0, []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
start = time.monotonic()
while not stopped:
    while count < int((time.monotonic() - start) * rate) and not stopped:
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/true", ["true"])
        os.waitpid(pid, 0)
        count += 1
    time.sleep(0.001)
print(count / (time.monotonic() - start), flush=True)
"""


@contextmanager
def background_churn(rate: int) -> Iterator[None]:
    """/bin/true fork+exec'd `rate` times a second meanwhile (0: none), and checked to
    have kept at least 80% of that rate."""
    if not rate:
        yield
        return
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(rate)], stdout=subprocess.PIPE)
    try:
        yield
    finally:
        churn.terminate()
        out, _ = churn.communicate(timeout=30)
    assert float(out) >= 0.8 * rate, f"the churn kept {float(out):.0f} execs/s"


@pytest.mark.parametrize("churn_rate", [0, 300], ids=["alone", "beside_300_execs_per_s"])
def test_short_lived_processes_are_fully_symbolized(
    require_bpf: None, c_binaries: Path, tmp_path: Path, churn_rate: int
) -> None:
    binary = c_binaries / "spin_pie"
    with (
        background_churn(churn_rate),
        sample_runs([[str(binary), SECONDS]] * RUNS, tmp_path) as captured,
    ):
        ours = samples_by_pid(captured)
        assert set(ours) == set(captured.pids), f"samples for {len(ours)} of {RUNS} processes"
        own_functions = defined_functions(binary)
        assert own_functions >= BINARY_FUNCTIONS
        in_binary = total = 0
        for pid, samples in ours.items():
            process = captured.processes.get(pid)
            assert process is not None, f"{pid} was never captured"
            functions_seen: set[str] = set()
            for sample in samples:
                locations = captured.symbolizer.symbolize(
                    process, sample.user_stack, sample.kernel_stack
                )
                for location in locations:
                    if location.mapping is not None and location.mapping.path == str(binary):
                        assert location.frames, f"unnamed frame {location.address:#x} in {pid}"
                        assert location.frames[0].function in own_functions, location
                functions = {f.function for loc in locations for f in loc.frames}
                functions_seen |= functions
                in_binary += sample.count * bool(functions & BINARY_FUNCTIONS)
                total += sample.count
            assert "inner_spin" in functions_seen, f"{pid}: {sorted(functions_seen)}"
    # Nearly all the time is spent under main; a few samples land in ld.so, exec or exit.
    assert in_binary >= 0.8 * total, f"{in_binary} of {total} samples under main"


def test_a_process_that_execs_after_running_is_read_again(
    require_bpf: None, c_binaries: Path, tmp_path: Path
) -> None:
    # Python runs (and is sampled and captured) for 0.5 CPU seconds, then execs the
    # spinner under the same pid and start time; only the exec event says the image
    # changed, and the spinner exits before any drain could refresh it.
    binary = str(c_binaries / "spin_pie")
    script = (
        "import os, time\n"
        "end = time.process_time() + 0.5\n"
        "while time.process_time() < end: pass\n"
        f"os.execv({binary!r}, [{binary!r}, {SECONDS!r}])\n"
    )
    with sample_runs([[sys.executable, "-c", script]], tmp_path) as captured:
        (pid,) = captured.pids
        process = captured.processes.get(pid)
        assert process is not None and process.exe == binary
        functions: set[str] = set()
        for sample in samples_by_pid(captured)[pid]:
            locations = captured.symbolizer.symbolize(
                process, sample.user_stack, sample.kernel_stack
            )
            functions |= {f.function for loc in locations for f in loc.frames}
        assert "inner_spin" in functions, sorted(functions)
