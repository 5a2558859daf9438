"""Short-lived processes against the real kernel: ten 0.3 s CPU burners run one after
the other; the agent's composition (sampler ring buffer -> ProcessCache.capture ->
BackgroundIndexer.watch, as Pipeline.capture_new_processes does) captures each one at
its first sample; the window is drained only after all of them have exited, and every
one of their samples must still come out symbolized with the test binary's functions.
"""

from __future__ import annotations

import subprocess
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.model import StackSample
from agent.process.cache import ProcessCache
from agent.sampler import Sampler
from agent.symbolize.background import BackgroundIndexer
from agent.symbolize.symbolizer import Symbolizer

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


def capture_until(
    stop: threading.Event, sampler: Sampler, processes: ProcessCache, indexer: BackgroundIndexer
) -> None:
    while not stop.is_set():
        for pid in sampler.poll_new_pids(timeout_ms=50):
            process = processes.capture(pid)
            if process is not None:
                indexer.watch(process)


def test_short_lived_processes_are_fully_symbolized(
    require_bpf: None, c_binaries: Path, tmp_path: Path
) -> None:
    binary = c_binaries / "spin_pie"
    sampler = Sampler(frequency=99)
    processes = ProcessCache()
    symbolizer = Symbolizer(cache_dir=tmp_path)
    indexer = BackgroundIndexer(symbolizer, interval=0.5)
    stop = threading.Event()
    capturer = threading.Thread(
        target=capture_until, args=(stop, sampler, processes, indexer), daemon=True
    )
    pids: list[int] = []
    try:
        sampler.start()
        sampler.drain()
        indexer.start()
        capturer.start()
        for _ in range(RUNS):
            child = subprocess.Popen([str(binary), SECONDS])
            pids.append(child.pid)
            assert child.wait(timeout=60) == 0
        stop.set()
        capturer.join(timeout=30)
        window = sampler.drain()  # every process has exited by now
    finally:
        stop.set()
        indexer.stop()
        sampler.close()
    ours: dict[int, list[StackSample]] = defaultdict(list)
    for sample in window.samples:
        if sample.pid in pids:
            ours[sample.pid].append(sample)
    assert set(ours) == set(pids), f"samples for {len(ours)} of {RUNS} processes"
    own_functions = defined_functions(binary)
    assert own_functions >= BINARY_FUNCTIONS
    in_binary = total = 0
    for pid, samples in ours.items():
        process = processes.get(pid)
        assert process is not None, f"{pid} was never captured"
        functions_seen: set[str] = set()
        for sample in samples:
            locations = symbolizer.symbolize(process, sample.user_stack, sample.kernel_stack)
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
    symbolizer.close()
