"""Scale: user-space cost per window against unique stacks and samples.

Scenarios (each: start the processes, start the agent, skip two windows of warm-up,
then measure --windows windows):
- flat:   2 processes in one hot loop (`workload flat`): many samples, few stacks;
- random: --processes processes (default 1,000) walking a random call tree
          (`workload stacks`): nearly every sample is a stack of its own;
- random at a lower frequency: the same host with fewer samples and stacks.
All workload processes run under SCHED_IDLE (`chrt --idle 0`): they still saturate
the CPUs, but the agent, this script and the machine's other users keep their share
(at nice 19, 1,000 busy processes outweigh a nice-0 process 15:1 and starve it).

Per window: strobe_window_processing_seconds (resolve + symbolize + label + pprof,
from the histogram's sum/count), strobe_window_unique_stacks and strobe_samples_total
after each window, samples lost in BPF, stack-map fill, and the agent's whole CPU
time per window from /proc (which also covers draining the BPF maps and writing the
local store, outside the histogram). Target (issue 8): 1,000 processes and 20,000
unique stacks per window handled in < 10% of the window. Needs root.
"""

from __future__ import annotations

import argparse
import operator
import resource
import time
from functools import partial
from pathlib import Path
from typing import Any

from _harness import (
    Agent,
    Crowd,
    base_parser,
    build_workload,
    emit,
    metric,
    mib,
    require_root,
    scratch,
    spread,
)


def window_stats(agent: Agent, windows: int) -> list[dict[str, float]]:
    """One row per window: what /metrics and /proc say changed during it."""
    rows = []
    done = metric(agent.metrics(), "strobe_windows_total")
    before, cpu_before = agent.metrics(), agent.cpu_seconds()
    for _ in range(windows):
        done += 1
        agent.wait_metric("strobe_windows_total", partial(operator.le, done), timeout=300)
        after, cpu_after = agent.metrics(), agent.cpu_seconds()

        def delta(name: str, a: dict[str, float] = after, b: dict[str, float] = before) -> float:
            return metric(a, name) - metric(b, name)

        rows.append(
            {
                "processing_s": delta("strobe_window_processing_seconds_sum"),
                "unique_stacks": metric(after, "strobe_window_unique_stacks"),
                "samples": delta("strobe_samples_total"),
                "lost": delta("strobe_samples_lost_total"),
                "stack_map_fill": after.get('strobe_bpf_map_fill_ratio{map="stacks"}', 0.0),
                "agent_cpu_s": round(cpu_after - cpu_before, 2),
            }
        )
        before, cpu_before = after, cpu_after
    return rows


def scenario(
    workdir: Path, argv: list[str], processes: int, hz: int, args: argparse.Namespace
) -> dict[str, Any]:
    window_s, windows = args.window, args.windows
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()

    with Crowd() as crowd:
        crowd.fork(argv, processes, idle=True)
        time.sleep(1.0)
        phase("spawn_s")
        agent = Agent(workdir, frequency=hz, window=f"{window_s:g}s").start()
        try:
            agent.wait_ready()
            phase("ready_s")
            agent.wait_metric(
                "strobe_windows_total", partial(operator.le, args.warmup), timeout=600
            )
            phase("warmup_s")
            rows = window_stats(agent, windows)
            rss = agent.rss_kib()
            phase("measure_s")
        finally:
            agent.stop()
        phase("agent_stop_s")
    phase("crowd_stop_s")
    processing = [r["processing_s"] for r in rows]
    stacks = [r["unique_stacks"] for r in rows]
    return {
        "workload": " ".join(argv[1:]),
        "processes": processes,
        "frequency_hz": hz,
        "window_s": window_s,
        "unique_stacks": spread(stacks),
        "samples_per_window": spread([r["samples"] for r in rows]),
        "lost_per_window": spread([r["lost"] for r in rows]),
        "processing_s": spread(processing),
        "processing_share_of_window": round(max(processing) / window_s, 4),
        "agent_cpu_s_per_window": spread([r["agent_cpu_s"] for r in rows]),
        "agent_cpu_share_of_window": round(max(r["agent_cpu_s"] for r in rows) / window_s, 4),
        "ms_per_1000_unique_stacks": round(1000 * 1000 * sum(processing) / max(sum(stacks), 1), 2),
        "rss_mib": mib(rss),
        "phases": phases,
        "windows": rows,
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--processes", type=int, default=1000, help="random-walk processes")
    parser.add_argument("--frequency", type=int, default=1000, help="Hz (max the agent takes)")
    parser.add_argument("--low-frequency", type=int, default=99, help="Hz of the third run")
    parser.add_argument("--window", type=float, default=10.0, help="window seconds")
    parser.add_argument("--windows", type=int, default=4, help="measured windows per run")
    parser.add_argument("--warmup", type=int, default=2, help="windows skipped first")
    parser.add_argument(
        "--scenarios", default="flat,random,random-low", help="which runs, comma-separated"
    )
    args = parser.parse_args()
    if args.quick:
        args.windows, args.warmup = 2, 1
    require_root()
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    started = time.monotonic()
    with scratch("scale") as workdir:
        workload = str(build_workload(workdir))
        stacks = [workload, "stacks", "0"]
        plans = {
            "flat": ([workload, "flat", "0"], 2, args.frequency),
            "random": (stacks, args.processes, args.frequency),
            "random-low": (stacks, args.processes, args.low_frequency),
        }
        runs = [scenario(workdir, *plans[name], args) for name in args.scenarios.split(",")]
        for run in runs:
            print(
                f"{run['workload']} x{run['processes']} @ {run['frequency_hz']} Hz: "
                f"{run['unique_stacks']['median']:.0f} stacks, "
                f"{run['samples_per_window']['median']:.0f} samples, "
                f"processing {run['processing_s']['median']:.3f} s, "
                f"agent CPU {run['agent_cpu_s_per_window']['median']:.2f} s per window",
                flush=True,
            )
    emit(
        "scale",
        {"settings": vars(args), "runs": runs, "elapsed_s": round(time.monotonic() - started, 1)},
        args.json,
    )


if __name__ == "__main__":
    main()
