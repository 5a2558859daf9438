"""What table-driven unwinding costs: BPF time per sample, and table memory.

    sudo .venv/bin/python benchmarks/unwind.py [--seconds 5] [--frequency 999]

1. Unwind tables for every process running on this machine: build time, rows, bytes,
   trie routes, and the largest binaries (tables built by agent.unwind, loaded into
   the real BPF maps by a dwarf-mode sampler).
2. BPF cost per sample, fp vs dwarf, for workloads of known depth: run-time stats are
   enabled for the run (BPF_ENABLE_STATS, the syscall form of kernel.bpf_stats_enabled),
   and run_time_ns / run_cnt of on_cpu_clock are read from /proc/self/fdinfo. A
   tail-called walker's time is counted in on_cpu_clock, the program the event
   entered. Each sampler filters on the workload's
   pid; the ticks it filters out still run the program (a few dozen ns), so their cost
   is measured first with a filter that matches nothing and subtracted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.model import ProcessInfo  # noqa: E402
from agent.process.reader import read_process  # noqa: E402
from agent.sampler import Sampler  # noqa: E402
from agent.unwind.registry import resolve_binary  # noqa: E402
from agent.unwind.table import ROW_SIZE, UnwindTableError, read_unwind_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SYS_BPF, BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 321, 32, 0  # x86_64
MODES = ("fp", "dwarf")
RECURSION_C = r"""
#include <stdlib.h>
#include <time.h>
volatile unsigned long sink;
__attribute__((noinline)) unsigned long down(int depth, unsigned long n) {
    volatile unsigned long pad[3] = {n, n + 1, n + 2};
    if (depth == 0) {
        unsigned long t = n;
        for (unsigned long i = 0; i < 200000UL; i++) t += i ^ (t >> 3);
        return t;
    }
    return down(depth - 1, n + pad[1]) + pad[2];
}
int main(int argc, char **argv) {
    int depth = atoi(argv[1]);
    double seconds = atof(argv[2]);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        sink += down(depth, 1);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
"""
PYTHON_FIB = (
    "import sys, time\n"
    "def fib(n):\n"
    "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    fib(18)\n"
)


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """Run-time stats on while the fd BPF_ENABLE_STATS returns is open.

    Unlike writing the sysctl, this holds even if another tool turns the sysctl off.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)  # union bpf_attr { .enable_stats.type }
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise SystemExit(f"BPF_ENABLE_STATS: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        os.close(fd)


def build_workloads(out: Path, seconds: float) -> dict[str, list[str]]:
    source = out / "recursion.c"
    source.write_text(RECURSION_C)
    flags = ["-O2", "-fomit-frame-pointer"]
    subprocess.run(
        ["gcc", *flags, "-o", str(out / "deep_nofp"), str(REPO / "tests/data/c/deep_nofp.c")],
        check=True,
    )
    subprocess.run(["gcc", *flags, "-o", str(out / "recursion"), str(source)], check=True)
    long = str(seconds * 4 + 30)
    return {
        "C, 11 frames (deep_nofp)": [str(out / "deep_nofp"), long],
        "python3 fib (Debian)": ["/usr/bin/python3", "-c", PYTHON_FIB, long],
        "C recursion, ~104 frames": [str(out / "recursion"), "100", long],
    }


def start(argv: list[str]) -> tuple[subprocess.Popen[bytes], ProcessInfo]:
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = read_process(proc.pid)
        if info is not None and any("libc.so" in m.path for m in info.mappings):
            return proc, info
        time.sleep(0.01)
    proc.kill()
    raise SystemExit(f"{argv[0]} did not start")


def run_delta(sampler: Sampler, seconds: float) -> tuple[int, int, list[tuple[int, int]]]:
    """(run_time_ns, run_cnt) of on_cpu_clock over `seconds`, and (depth, count) samples."""
    sampler.drain()
    before = sampler.bpf_run_stats()["on_cpu_clock"]
    time.sleep(seconds)
    after = sampler.bpf_run_stats()["on_cpu_clock"]
    window = sampler.drain()
    depths = [(len(s.user_stack), s.count) for s in window.samples]
    return after[0] - before[0], after[1] - before[1], depths


def filtered_out_cost(mode: str, frequency: int, seconds: float) -> float:
    """ns per tick of a process the pid filter rejects."""
    idle, _ = start(["sleep", "600"])
    try:
        with Sampler(frequency=frequency, pid=idle.pid, unwinder=mode) as sampler:
            sampler.start()
            ns, runs, _ = run_delta(sampler, seconds)
        return ns / runs if runs else 0.0
    finally:
        idle.kill()
        idle.wait()


def sample_cost(
    mode: str, frequency: int, seconds: float, argv: list[str], rejected_ns: float
) -> dict[str, float]:
    proc, info = start(argv)
    try:
        with Sampler(frequency=frequency, pid=proc.pid, unwinder=mode) as sampler:
            sampler.start()
            if sampler.unwind_tables is not None:
                sampler.unwind_tables.prepare(info)
            sampler.unwind_stats()  # count from here: tables are in place
            ns, runs, depths = run_delta(sampler, seconds)
            stats = sampler.unwind_stats()
    finally:
        proc.kill()
        proc.wait()
    samples = sum(count for _, count in depths)
    own_ns = ns - (runs - samples) * rejected_ns
    return {
        "samples": samples,
        "ns_per_sample": own_ns / samples if samples else 0.0,
        "mean_depth": sum(d * c for d, c in depths) / samples if samples else 0.0,
        "table_frames": stats.get("table_frames", 0),
        "fp_frames": stats.get("frame_pointer_frames", 0),
    }


@dataclass
class MachineTables:
    processes: list[ProcessInfo]
    sizes: dict[str, tuple[int, str, float]]  # key -> rows, a path, parse seconds
    failed: int  # mapped files without a usable table


def machine_tables() -> MachineTables:
    """Build the table of every binary mapped by a running process (pure Python)."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()]
    processes = [p for p in map(read_process, pids) if p is not None]
    sizes: dict[str, tuple[int, str, float]] = {}
    failed = 0
    for process in processes:
        for mapping in process.mappings:
            source = resolve_binary(process.pid, mapping)
            if source is None or source.key in sizes:
                continue
            started = time.perf_counter()
            try:
                with source.open() as stream:
                    rows = len(read_unwind_table(stream))
            except (OSError, UnwindTableError):
                failed += 1
                continue
            sizes[source.key] = (rows, mapping.path, time.perf_counter() - started)
    return MachineTables(processes, sizes, failed)


def load_machine(frequency: int, processes: list[ProcessInfo]) -> dict[str, float]:
    """Load every process's tables into a real dwarf-mode sampler's maps."""
    with Sampler(frequency=frequency, unwinder="dwarf") as sampler:
        sampler.start()
        tables = sampler.unwind_tables
        assert tables is not None
        started = time.perf_counter()
        for process in processes:
            tables.prepare(process)
        seconds = time.perf_counter() - started
        stats = tables.stats()
        memory = sampler.bpf_map_memory()
    return {
        "seconds": seconds,
        "tables": stats.tables,
        "rows": stats.rows_used,
        "capacity": stats.rows_capacity,
        "refused": stats.failed_binaries,
        "routes": stats.routes,
        "processes": stats.processes,
        "rows_map_bytes": memory["unwind_rows"],
        "routes_map_bytes": memory["unwind_mappings"],
    }


def report_machine(built: MachineTables, loaded: dict[str, float]) -> None:
    rows = sum(r for r, _, _ in built.sizes.values())
    parse = sum(t for _, _, t in built.sizes.values())
    print("## Unwind tables for every process on this machine\n")
    print(
        f"- processes: {len(built.processes)}, distinct binaries with a table: "
        f"{len(built.sizes)}, without: {built.failed}"
    )
    print(
        f"- rows: {rows:,} ({rows * ROW_SIZE / 2**20:.2f} MiB at {ROW_SIZE} B/row); "
        f"parse time {parse:.2f} s in total"
    )
    print(
        f"- loaded into BPF ({loaded['capacity']:,.0f} rows): {loaded['tables']:.0f} tables, "
        f"{loaded['rows']:,.0f} rows, {loaded['routes']:,.0f} trie routes for "
        f"{loaded['processes']:.0f} processes in {loaded['seconds']:.2f} s; "
        f"{loaded['refused']:.0f} binaries refused or without a table"
    )
    print(
        f"- kernel memory: rows array {loaded['rows_map_bytes'] / 2**20:.1f} MiB "
        f"(preallocated), routes trie {loaded['routes_map_bytes'] / 2**20:.2f} MiB\n"
    )
    print("| binary | rows | KiB | parse ms |\n|---|---|---|---|")
    for count, path, seconds in sorted(built.sizes.values(), reverse=True)[:10]:
        print(f"| {path} | {count:,} | {count * ROW_SIZE / 1024:.0f} | {seconds * 1000:.0f} |")
    print()


def report_costs(frequency: int, seconds: float, rounds: int) -> None:
    print(
        f"## BPF cost per sample ({frequency} Hz, {seconds:.0f} s per run, "
        f"{rounds} alternating runs per mode: median [min, max])\n"
    )
    print("| workload | mode | samples | mean user frames | table / fp steps | ns per sample |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, bpf_stats():
        workloads = build_workloads(Path(tmp), seconds)
        rejected = {mode: filtered_out_cost(mode, frequency, 3.0) for mode in MODES}
        for name, argv in workloads.items():
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    runs[mode].append(sample_cost(mode, frequency, seconds, argv, rejected[mode]))
            for mode in MODES:
                print_cost_row(name, mode, runs[mode])
        for mode in MODES:
            print(f"| (ticks of other pids, filtered out) | {mode} | | | | {rejected[mode]:.0f} |")


def print_cost_row(name: str, mode: str, runs: list[dict[str, float]]) -> None:
    costs = sorted(r["ns_per_sample"] for r in runs)
    samples = sum(r["samples"] for r in runs)
    depth = sum(r["mean_depth"] * r["samples"] for r in runs) / samples if samples else 0.0
    steps = f"{sum(r['table_frames'] for r in runs):.0f} / {sum(r['fp_frames'] for r in runs):.0f}"
    cost = f"{statistics.median(costs):.0f} [{costs[0]:.0f}, {costs[-1]:.0f}]"
    print(f"| {name} | {mode} | {samples:.0f} | {depth:.1f} | {steps} | {cost} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--frequency", type=int, default=999)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF)")
    logging.basicConfig(level=logging.ERROR)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    built = machine_tables()
    rss_grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    report_machine(built, load_machine(args.frequency, built.processes))
    print(f"(building them all grew the benchmark's peak RSS by {rss_grew:.0f} MiB)\n")
    report_costs(args.frequency, args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
