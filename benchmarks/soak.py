"""Soak: the agent under constant process churn; RSS, file descriptors and windows over time.

While the agent runs (default 30 minutes, 10 s windows, 19 Hz), a churner keeps 200
short-lived processes alive: each sleeps for 0.2-3 s (or, one in 20, burns CPU for
0.05-0.5 s) and exits, and is replaced at once, so thousands of processes start and
exit. Every 30 s the script records the agent's RSS (VmRSS), its open file descriptors
(/proc/PID/fd), its threads, and strobe_windows_total. At the end it reports:
- RSS: the mean of the first third of the run (after a warm-up) vs the last third
  (flat means within +-10%), and the peak (VmHWM);
- fds and threads: first vs last sample (a leak grows);
- windows: delivered vs expected (duration / window), i.e. lost windows.
Needs root. Issue 9's target: flat RSS (+-10%), no fd leak, no lost windows.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from _harness import Agent, base_parser, emit, metric, mib, require_root, scratch

CHURN_PROCESSES = 200
# ~2 bursts running at a time on average: busy, without starving a 2-CPU machine
BURST_SHARE = 0.05
SAMPLE_EVERY = 30.0


def churn(stop: threading.Event, count: int, started: list[int]) -> None:
    """Keep `count` short-lived processes running until `stop`."""
    rng = random.Random(7)
    running: list[subprocess.Popen[bytes]] = []
    try:
        while not stop.is_set():
            running = [p for p in running if p.poll() is None]
            while len(running) < count:
                if rng.random() < BURST_SHARE:  # a CPU burst: samples and stacks to attribute
                    seconds = rng.uniform(0.05, 0.5)
                    argv = ["timeout", f"{seconds:.2f}", "sh", "-c", "while :; do :; done"]
                else:
                    argv = ["sleep", f"{rng.uniform(0.2, 3.0):.2f}"]
                running.append(subprocess.Popen(argv, start_new_session=True))
                started[0] += 1
            stop.wait(0.05)
    finally:
        for proc in running:  # the whole group: timeout's child too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in running:
            proc.wait()


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return -1


def summarize(
    samples: list[dict[str, Any]],
    minutes: float,
    window: float,
    windows: float,
    hwm_kib: int,
    started: int,
) -> dict[str, Any]:
    third = max(len(samples) // 3, 1)
    early = [s["rss_mib"] for s in samples[1 : third + 1]] or [samples[0]["rss_mib"]]
    late = [s["rss_mib"] for s in samples[-third:]]
    early_mean, late_mean = sum(early) / len(early), sum(late) / len(late)
    expected = int(minutes * 60 / window)
    return {
        "minutes": minutes,
        "processes_started": started,
        "rss_early_mib": round(early_mean, 1),
        "rss_late_mib": round(late_mean, 1),
        "rss_change_percent": round(100 * (late_mean - early_mean) / early_mean, 1),
        "rss_peak_mib": mib(hwm_kib),
        "fds_first_last": (samples[0]["fds"], samples[-1]["fds"]),
        "threads_first_last": (samples[0]["threads"], samples[-1]["threads"]),
        "windows_delivered": int(windows),
        "windows_expected": expected,
        "windows_lost": max(expected - int(windows) - 1, 0),  # the last may be mid-flight
        "series": samples,
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args()
    require_root()
    minutes = 2.0 if args.quick else args.minutes
    stop = threading.Event()
    started = [0]
    with scratch("soak") as workdir, Agent(Path(workdir), window=f"{args.window}s") as agent:
        agent.wait_ready()
        churner = threading.Thread(target=churn, args=(stop, CHURN_PROCESSES, started))
        churner.start()
        samples: list[dict[str, Any]] = []
        begin = time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - begin
                samples.append(
                    {
                        "t": round(elapsed),
                        "rss_mib": mib(agent.rss_kib()),
                        "fds": fd_count(agent.pid),
                        "threads": thread_count(agent.pid),
                        "windows": metric(agent.metrics(), "strobe_windows_total"),
                    }
                )
                if elapsed >= minutes * 60:
                    break
                time.sleep(min(SAMPLE_EVERY, minutes * 60 - elapsed + 0.1))
            windows = samples[-1]["windows"]
            hwm = agent.hwm_kib()
        finally:
            stop.set()
            churner.join()
    emit("soak", summarize(samples, minutes, args.window, windows, hwm, started[0]), args.json)


if __name__ == "__main__":
    main()
