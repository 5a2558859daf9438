"""Start-up: seconds from `strobe run` to sampling, to ready, and to the first samples.

Each run starts the agent with a 1 s window and times, from the moment the process is
spawned:
- attached: the log line "sampler attached" arrives (the perf events are on, the
  first sample follows within 1/Hz);
- ready: GET /readyz answers 200 (polled every 20 ms);
- first samples: /metrics shows strobe_samples_total > 0 (the first 1 s window has
  been drained, so this is an upper bound on the first sample by about a second).
It also records the agent's CPU seconds and RSS at the first samples. The first run
uses an empty cache directory (cold: kernel header tree merged, nothing cached),
the next ones reuse it (warm: the header tree and the compiled BPF program cached).
`--busy N` runs N busy processes (benchmarks/workload.c spin) throughout, as on a
loaded node. Targets (issue 16): first sample <= 1 s warm and <= 3 s cold quiet;
<= 3 s warm beside 20 busy processes on 2 CPUs. Needs root.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _harness import (
    Agent,
    Crowd,
    base_parser,
    build_workload,
    emit,
    mib,
    require_root,
    scratch,
    spread,
)


def one_start(workdir: Path, hz: int) -> dict[str, Any]:
    with Agent(workdir, frequency=hz, window="1s") as agent:
        ready = agent.wait_ready()
        first_samples = agent.wait_metric("strobe_samples_total", lambda v: v > 0, poll=0.05)
        attached_at = agent.log.wait_for("sampler attached", timeout=5)
        cpu, rss = agent.cpu_seconds(), agent.rss_kib()
    attached = (attached_at - agent.started) if attached_at is not None else float("nan")
    return {
        "attached_s": round(attached, 3),
        "ready_s": round(ready, 3),
        "first_samples_s": round(first_samples, 3),
        "cpu_s": cpu,
        "rss_mib": mib(rss),
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--runs", type=int, default=6, help="starts (the first one cold)")
    parser.add_argument("--frequency", type=int, default=19, help="Hz")
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside the agent")
    args = parser.parse_args()
    if args.quick:
        args.runs = 4
    require_root()
    runs = []
    with scratch("startup") as workdir, Crowd() as crowd:
        if args.busy:
            crowd.fork([str(build_workload(workdir)), "spin", "3600"], args.busy)
        for index in range(args.runs):
            runs.append(one_start(workdir, args.frequency))
            print(f"run {index + 1}/{args.runs}: {runs[-1]}", flush=True)
            time.sleep(0.5)
    warm = runs[1:] or runs
    emit(
        "startup",
        {
            "settings": {
                "runs": args.runs,
                "frequency_hz": args.frequency,
                "window": "1s",
                "busy": args.busy,
            },
            "cold": runs[0],
            "warm": {
                key: spread([r[key] for r in warm])
                for key in ("attached_s", "ready_s", "first_samples_s", "cpu_s", "rss_mib")
            },
            "runs": runs,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
