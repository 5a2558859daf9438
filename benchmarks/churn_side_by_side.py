"""Process churn beside perf and bcc's profile: each tool's CPU per exec, in one run.

Each tool samples the whole host at 19 Hz (Strobe's default) while a driver forks and
execs /bin/true at each rate (churn.py's method, --repeats spans per rate, each churn
span against the idle spans on either side of it). Counted: the CPU of the tool's own
process tree (threads, reaped children, live descendants) in user and system time.
Not counted for any tool: the BPF programs' time, which the kernel books to the process
that was running (here mostly the churning ones). The tools run one after another, not
at once (each would also profile the others):
- Strobe: `strobe run` (warm program cache, 10 s windows, local store), after it settles;
- `perf record -a -g -F 19` to a file: it records every exec's comm and mmap events;
- `profile-bpfcc -F 19`: stacks counted in the kernel, symbolized only at exit (not
  measured here, so its per-exec cost is near zero by construction).
Needs root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _harness import Agent, base_parser, emit, require_root, scratch
from churn import measure_repeated
from startup_side_by_side import NCPU, bcc_environment, perf_fds

FREQUENCY = 19


@contextlib.contextmanager
def strobe(workdir: Path) -> Iterator[int]:
    with Agent(workdir / "strobe", frequency=FREQUENCY) as agent:
        agent.wait_ready()
        agent.wait_settled(share=0.02, interval=5.0)  # start-up's tables and indexes done
        yield agent.pid


@contextlib.contextmanager
def tool(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[int]:
    """A tool that samples until stopped: its pid once its events are open and it has
    had a few seconds to finish starting."""
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while perf_fds(proc.pid) < NCPU:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[0]} did not start (exit {proc.returncode})")
            time.sleep(0.05)
        time.sleep(5)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)  # bcc's exit would symbolize every stack first
        proc.wait()


def tools(workdir: Path) -> dict[str, Any]:
    return {
        "Strobe (strobe run)": lambda: strobe(workdir),
        "perf record -a -g": lambda: tool(
            ["perf", "record", "-q", "-a", "-g", "-F", str(FREQUENCY)]
            + ["-o", str(workdir / "perf.data")]
        ),
        "bcc profile": lambda: tool(
            ["/usr/sbin/profile-bpfcc", "-F", str(FREQUENCY)], env=bcc_environment()
        ),
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rates", default="100,300,1000", help="execs per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each span")
    parser.add_argument("--repeats", type=int, default=2, help="churn spans per rate")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds, args.repeats = "300", 5.0, 1
    require_root()
    rates = [int(r) for r in args.rates.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    with scratch("churn-sbs") as workdir:
        for name, start in tools(workdir).items():
            with start() as pid:
                results[name] = []
                for rate in rates:
                    results[name].append(measure_repeated(pid, rate, args.seconds, args.repeats))
                    brief = {k: v for k, v in results[name][-1].items() if k != "spans"}
                    print(name, brief, flush=True)
    print("\n| tool | " + " | ".join(f"{r}/s: ms per exec (min-max)" for r in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for name, rows in results.items():
        cells = [f"{r['per_exec_ms']:.3f} ({r['min_ms']:.3f}-{r['max_ms']:.3f})" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    settings = {"seconds": args.seconds, "repeats": args.repeats, "frequency": FREQUENCY}
    emit("churn_side_by_side", {"settings": settings, "tools": results}, args.json)


if __name__ == "__main__":
    main()
