"""Process churn: the agent's CPU per exec while short processes come and go.

For each rate R (execs per second), the agent runs (19 Hz, 10 s windows, warm cache);
after it settles, a driver forks and execs /bin/true R times a second for `--seconds`;
the agent's CPU (its threads, reaped children and live descendants) over that span,
minus the same span without churn, divided by the execs, is its cost per exec. The span
without churn is measured before each rate and the smaller of it and the first one is
used: background work (indexing a binary, start-up's tail) lands in either.

With --repeats N (for a shared machine, where the agent also profiles whatever else
runs there), each rate is measured N times as idle, churn, idle, churn, ..., idle:
each churn span minus the mean of the idle spans on either side of it, per exec; the
median of the N is reported, with the min and max.
Target (issue 16): at most 0.25 ms per exec. Needs root.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from _harness import Agent, base_parser, emit, require_root, scratch, tree_cpu_seconds


def churn(rate: int, seconds: float) -> int:
    """fork+exec /bin/true `rate` times a second (reaped); how many ran."""
    count, started = 0, time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate)
        while count < due:
            pid = os.fork()
            if pid == 0:
                os.execv("/bin/true", ["true"])
            os.waitpid(pid, 0)
            count += 1
        time.sleep(0.001)
    return count


def cpu_over(pid: int, seconds: float, rate: int) -> tuple[float, int]:
    """CPU seconds of the process tree of `pid` over `seconds` of churn at `rate` (0: idle)."""
    before = tree_cpu_seconds(pid)
    execs = churn(rate, seconds) if rate else (time.sleep(seconds) or 0)
    return tree_cpu_seconds(pid) - before, execs


def measure_repeated(pid: int, rate: int, seconds: float, repeats: int) -> dict[str, Any]:
    """idle, churn, idle, ..., idle: each churn span against the idle spans beside it."""
    idles = [cpu_over(pid, seconds, 0)[0]]
    spans = []
    for _ in range(repeats):
        cpu, execs = cpu_over(pid, seconds, rate)
        idles.append(cpu_over(pid, seconds, 0)[0])
        idle = (idles[-2] + idles[-1]) / 2
        spans.append((1000 * max(0.0, cpu - idle) / max(1, execs), cpu, idle, execs))
    per_exec = [span[0] for span in spans]
    median = statistics.median(per_exec)
    execs = statistics.median(span[3] for span in spans)  # below `rate` past the driver's limit
    return {
        "rate": rate,
        "execs": round(execs),
        "per_exec_ms": round(median, 3),
        "min_ms": round(min(per_exec), 3),
        "max_ms": round(max(per_exec), 3),
        "core_share": round(median * execs / seconds / 1000, 3),
        "spans": [
            {"per_exec_ms": round(e, 3), "agent_cpu_s": round(c, 2), "idle_cpu_s": round(i, 2)}
            for e, c, i, _ in spans
        ],
    }


def measure(
    workdir: Path, rates: list[int], seconds: float, repeats: int = 0
) -> list[dict[str, Any]]:
    results = []
    with Agent(workdir) as agent:
        agent.wait_ready()
        agent.wait_settled(share=0.02, interval=5.0)  # start-up's tables and indexes done
        if repeats:
            for rate in rates:
                results.append(measure_repeated(agent.pid, rate, seconds, repeats))
                print({k: v for k, v in results[-1].items() if k != "spans"}, flush=True)
            return results
        first_idle, _ = cpu_over(agent.pid, seconds, 0)
        for rate in rates:
            idle = min(first_idle, cpu_over(agent.pid, seconds, 0)[0])
            cpu, execs = cpu_over(agent.pid, seconds, rate)
            per_exec_ms = 1000 * max(0.0, cpu - idle) / max(1, execs)
            results.append(
                {
                    "rate": rate,
                    "execs": execs,
                    "agent_cpu_s": round(cpu, 2),
                    "idle_cpu_s": round(idle, 2),
                    "per_exec_ms": round(per_exec_ms, 3),
                    "core_share": round(max(0.0, cpu - idle) / seconds, 3),
                }
            )
            print(results[-1], flush=True)
    return results


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rates", default="100,300,1000", help="execs per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--repeats", type=int, default=0, help="churn spans per rate, each between idle ones"
    )
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds = "300", 10.0
    require_root()
    rates = [int(r) for r in args.rates.split(",")]
    with scratch("churn") as workdir:
        results = measure(workdir, rates, args.seconds, args.repeats)
    settings = {"seconds": args.seconds, "repeats": args.repeats}
    emit("churn", {"settings": settings, "rates": results}, args.json)


if __name__ == "__main__":
    main()
