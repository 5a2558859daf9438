"""Off-CPU overhead: pipe ping-pong throughput with `--off-cpu` on, against off.

Pairs A B, alternating: A is `strobe run --off-cpu [options]`, B is `strobe run` without
it; in each leg the agent is started, waited for (/readyz, a processed window, then under
5% of a CPU over 2 s), and benchmarks/offcpu_pingpong.c runs for --seconds, both sides
pinned to one CPU, each spinning --work-us per message (15 us: ~57k context switches/s
on the 2-vCPU dev VM; 0: ~340k/s). Every switch runs the sched_switch program; up to
--off-cpu-max-rate of them per second per CPU (default 1000) also walk the blocking
thread's stacks. The ratio of a pair is A/B round trips per second; we report its
median and spread, the switch rate (from /proc/stat), the agent's CPU during the legs,
and the kernel's own count of the
sched_switch program's cost (kernel.bpf_stats_enabled=1 during the A legs: run_time_ns
and run_cnt of the agent's busiest raw-tracepoint program, from /proc/PID/fdinfo; the
walks it tail-calls are included), which other load on the machine does not skew.

Target (issue 17): ratio >= 0.97 at >= 50k switches/s. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from _harness import REPO, Agent, base_parser, emit, require_root, scratch, spread

PINGPONG_SOURCE = REPO / "benchmarks" / "offcpu_pingpong.c"


def context_switches() -> int:
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    raise RuntimeError("/proc/stat has no ctxt line")


def pingpong(binary: Path, seconds: float, work_us: float) -> tuple[float, float]:
    """(round trips per second, context switches per second) of one run."""
    before, started = context_switches(), time.monotonic()
    out = subprocess.run(
        [str(binary), str(seconds), "-1", str(work_us)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    switches = (context_switches() - before) / (time.monotonic() - started)
    return float(out.split()[0]), switches


def raw_tracepoint_runs(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the process's busiest raw-tracepoint BPF program."""
    best = (0, 0)
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        fields: dict[str, str] = {}
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
        if fields.get("prog_type", "").strip() == "17":  # BPF_PROG_TYPE_RAW_TRACEPOINT
            runs = (int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0)))
            best = max(best, runs, key=lambda r: r[1])
    return best


def bpf_stats(enabled: bool) -> None:
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1" if enabled else "0")


def leg(workdir: Path, binary: Path, extra: list[str], seconds: float, work_us: float) -> dict:
    with Agent(workdir, window="5s", extra=extra) as agent:
        agent.wait_ready()
        agent.wait_metric("strobe_windows_total", lambda v: v >= 1)
        agent.wait_settled()
        cpu_before = agent.cpu_seconds()
        bpf_stats(True)
        try:
            time_before, runs_before = raw_tracepoint_runs(agent.pid)
            trips, switches = pingpong(binary, seconds, work_us)
            time_after, runs_after = raw_tracepoint_runs(agent.pid)
        finally:
            bpf_stats(False)
        agent_cpu = agent.cpu_seconds() - cpu_before
    runs = runs_after - runs_before
    return {
        "trips_per_s": trips,
        "switches_per_s": switches,
        "agent_cpu_s": agent_cpu,
        "sched_switch_ns_per_run": (time_after - time_before) / runs if runs else None,
    }


def measure(
    binary: Path, workdir: Path, options: list[str], pairs: int, seconds: float, work_us: float
) -> dict[str, Any]:
    legs = []
    for pair in range(pairs):
        on = leg(workdir, binary, ["--off-cpu", *options], seconds, work_us)
        off = leg(workdir, binary, [], seconds, work_us)
        legs.append({"on": on, "off": off, "ratio": on["trips_per_s"] / off["trips_per_s"]})
        print(
            f"{' '.join(options) or 'defaults'} pair {pair + 1}/{pairs}: "
            f"ratio {legs[-1]['ratio']:.4f}, {off['switches_per_s']:.0f} switches/s",
            flush=True,
        )
    return {
        "options": ["--off-cpu", *options],
        "work_us": work_us,
        "ratio": spread([leg["ratio"] for leg in legs]),
        "switches_per_s_off": spread([leg["off"]["switches_per_s"] for leg in legs]),
        "agent_cpu_s_on": spread([leg["on"]["agent_cpu_s"] for leg in legs]),
        "agent_cpu_s_off": spread([leg["off"]["agent_cpu_s"] for leg in legs]),
        "sched_switch_ns_per_run": spread(
            [leg["on"]["sched_switch_ns_per_run"] or 0.0 for leg in legs]
        ),
        "legs": legs,
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--pairs", type=int, default=5, help="A B pairs per configuration")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one leg")
    parser.add_argument("--work-us", type=float, default=15.0, help="spin per message")
    parser.add_argument(
        "--configs",
        default=",--off-cpu-max-rate 0",
        help="comma-separated extra agent options for A (empty: the defaults)",
    )
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.seconds = 2, 4.0
    require_root()
    started = time.monotonic()
    with scratch("off-cpu") as workdir:
        binary = workdir / "offcpu_pingpong"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(PINGPONG_SOURCE)], check=True)
        results = [
            measure(binary, workdir, config.split(), args.pairs, args.seconds, args.work_us)
            for config in args.configs.split(",")
        ]
    emit(
        "off_cpu",
        {"configs": results, "wall_seconds": round(time.monotonic() - started, 1)},
        args.json,
    )


if __name__ == "__main__":
    main()
