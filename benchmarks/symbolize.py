"""Symbolization budget: cold index time and memory, warm restart, lookup throughput.

    .venv/bin/python benchmarks/symbolize.py [BINARY] [--lookups N] [--json]

BINARY defaults to pyenv's libpython3.11 (23 MB, full DWARF), the library the budget
is stated for; any ELF file with DWARF works. The binary is laid out as ld.so would
map it (pid 0: opened by its host path), so nothing has to run.

Measured, each in a fresh cache directory:
  cold    Symbolizer.prepare(process): ELF symbols, debug-file search, SymCache built
          in the capped child (symcache_child.py), stored and mapped. Peak extra memory
          is the child's peak RSS (the indexing happens there) plus the growth of this
          process's RSS across the call.
  warm    a new Symbolizer over the same cache directory: prepare() maps the stored
          SymCache (a restart must not re-index).
  lookups symbolize() of single-address stacks: N distinct random code addresses
          (drawn uniformly inside function symbols, so the per-binary frames cache
          does not help), then the same N again (the steady state of a profiler,
          whose hot addresses repeat every window).
Budget (issue 3): cold <= 2 s and <= 150 MB extra peak memory; lookups >= 20,000/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.elf.reader import ElfInfo  # noqa: E402
from agent.model import Mapping, ProcessInfo  # noqa: E402
from agent.symbolize.symbolizer import Symbolizer  # noqa: E402

DEFAULT_BINARY = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"
BASE = 0x7F0000000000
PAGE = 4096
PF_X = 1


def loader_process(path: Path, elf: ElfInfo) -> ProcessInfo:
    """The executable mappings ld.so would create for `path` at BASE."""
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    mappings = tuple(
        Mapping(
            BASE + load.vaddr // PAGE * PAGE,
            BASE + -(-(load.vaddr + load.memsz) // PAGE) * PAGE,
            load.offset // PAGE * PAGE,
            str(path),
            dev,
            st.st_ino,
            "r-xp",
        )
        for load in elf.loads
        if load.flags & PF_X
    )
    return ProcessInfo(0, 0, "bench", str(path), mappings)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def code_addresses(elf: ElfInfo, process: ProcessInfo, count: int) -> list[int]:
    """Runtime addresses inside random function symbols."""
    table = elf.symbols
    starts = [s for s in table._starts if table.lookup(s) is not None]
    sizes = dict(zip(table._starts, table._sizes, strict=True))
    rng = random.Random(1)
    addresses = []
    for start in rng.choices(starts, k=count):
        vaddr = start + rng.randrange(max(1, sizes[start]))
        load = next(seg for seg in elf.loads if seg.vaddr <= vaddr < seg.vaddr + seg.filesz)
        offset = vaddr - load.vaddr + load.offset
        mapping = next(
            (m for m in process.mappings if m.offset <= offset < m.offset + m.end - m.start), None
        )
        if mapping is not None:
            addresses.append(mapping.start + offset - mapping.offset)
    return addresses


def lookups_per_second(symbolizer: Symbolizer, process: ProcessInfo, addresses: list[int]) -> float:
    started = time.perf_counter()
    for address in addresses:
        symbolizer.symbolize(process, (address,), ())
    return len(addresses) / (time.perf_counter() - started)


def run(binary: Path, lookups: int) -> dict[str, float | str]:
    elf = ElfInfo.read(str(binary))
    process = loader_process(binary, elf)
    with tempfile.TemporaryDirectory(prefix="strobe-bench-") as cache:
        rss_before = rss_bytes()
        cold = Symbolizer(cache_dir=cache)
        started = time.perf_counter()
        ready = cold.prepare(process)
        cold_seconds = time.perf_counter() - started
        parent_growth = max(0, rss_bytes() - rss_before)
        if ready != 1 or cold.stats.built != 1:
            raise SystemExit(f"{binary}: not indexed ({cold.stats})")
        child_peak = cold.stats.last_peak_rss_bytes
        warm = Symbolizer(cache_dir=cache)
        started = time.perf_counter()
        warm.prepare(process)
        warm_seconds = time.perf_counter() - started
        assert warm.stats.loaded == 1 and warm.stats.built == 0
        addresses = code_addresses(elf, process, lookups)
        with_lines = sum(
            1
            for a in addresses[:2000]
            if (loc := warm.symbolize(process, (a,), ())[0]).frames and loc.frames[0].line
        )
        distinct = lookups_per_second(Symbolizer(cache_dir=cache), process, addresses)
        hot = addresses[:10000]  # fits the per-binary frames cache
        lookups_per_second(warm, process, hot)
        repeated = lookups_per_second(warm, process, hot)
        symcache_bytes = sum(p.stat().st_size for p in Path(cache).glob("symbols/*.symcache"))
    return {
        "binary": str(binary),
        "binary_bytes": binary.stat().st_size,
        "cold_seconds": round(cold_seconds, 3),
        "child_peak_rss_mb": round(child_peak / 2**20, 1),
        "parent_rss_growth_mb": round(parent_growth / 2**20, 1),
        "extra_peak_mb": round((child_peak + parent_growth) / 2**20, 1),
        "warm_seconds": round(warm_seconds, 4),
        "symcache_mb": round(symcache_bytes / 2**20, 1),
        "lookups": len(addresses),
        "share_with_file_and_line": round(with_lines / min(2000, len(addresses)), 3),
        "distinct_lookups_per_second": round(distinct),
        "repeated_lookups_per_second": round(repeated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary", nargs="?", default=DEFAULT_BINARY, type=Path)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.binary.is_file():
        raise SystemExit(f"{args.binary}: no such file (pass an ELF binary with DWARF)")
    result = run(args.binary, args.lookups)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:28} {value}")
    ok = (
        float(result["cold_seconds"]) <= 2
        and float(result["extra_peak_mb"]) <= 150
        and float(result["distinct_lookups_per_second"]) >= 20_000
    )
    print("budget: " + ("met" if ok else "MISSED"))


if __name__ == "__main__":
    main()
