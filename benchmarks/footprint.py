"""Agent CPU and memory on a host of 200 processes, next to bcc's profile and perf record.

The host: 198 idle `sleep` processes and 2 busy ones (`workload spin`, niced so the
machine's other users keep their share; the CPUs stay saturated either way, so the
sampler sees the same ~2 x Hz samples a second).

1. Strobe (`strobe run`, 10 s windows) runs for --minutes. CPU is utime+stime of the
   agent and all its threads, plus cutime+cstime (reaped children, e.g. the BPF compile
   child) plus any live descendant, read from /proc/PID/stat. Steady state starts
   after the first processed window, once the agent uses < 5% of a CPU over 2 s (the
   background indexer is done with what the first window sampled; at most 90 s):
   start-up compile and indexing are reported apart. RSS (VmRSS) is sampled every
   5 s; steady RSS is the median of the last third of the run; peak is VmHWM.
   Descendants' peak RSS is tracked too.
2. bcc's profile tool (`profile-bpfcc -F HZ -af SECONDS`) and `perf record -a -F HZ -g`
   each run --compare-seconds on the same host, one after the other: total CPU and
   peak RSS from wait4's rusage, and steady CPU from /proc between 40% and 90% of the
   run (profile-bpfcc only reads its maps at exit; perf writes samples as it goes).

Targets (issue 8): <= 0.6 CPU s/min at 19 Hz; <= 80 MB steady RSS. Needs root.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from _harness import (
    Agent,
    Crowd,
    base_parser,
    build_workload,
    descendants,
    emit,
    metric,
    mib,
    pids,
    require_root,
    scratch,
    status_kib,
    tree_cpu_seconds,
)

SAMPLE_EVERY = 5.0


def host(crowd: Crowd, workload: Path, idle: int, busy: int, nice: int) -> None:
    crowd.spawn(["sleep", "infinity"], idle)
    crowd.spawn([str(workload), "spin", "0"], busy, nice=nice)


def run_strobe(workdir: Path, hz: int, seconds: float) -> dict[str, Any]:
    series: list[dict[str, float]] = []
    child_peak_kib = 0
    with Agent(workdir, frequency=hz, window="10s") as agent:
        ready = agent.wait_ready()
        first_window = agent.wait_metric("strobe_windows_total", lambda v: v >= 1)
        settled = agent.wait_settled()
        warm_cpu, warm_at = agent.cpu_seconds(), time.monotonic()
        end = warm_at + seconds
        next_sample = warm_at
        while time.monotonic() < end:
            for child in descendants(agent.pid):
                child_peak_kib = max(child_peak_kib, status_kib(child.pid, "VmHWM"))
            if time.monotonic() >= next_sample:
                next_sample += SAMPLE_EVERY
                series.append(
                    {
                        "t": round(time.monotonic() - warm_at, 1),
                        "rss_kib": agent.rss_kib(),
                        "anon_kib": status_kib(agent.pid, "RssAnon"),
                        "file_kib": status_kib(agent.pid, "RssFile"),
                        "cpu_s": agent.cpu_seconds(),
                    }
                )
            time.sleep(1.0)
        total_cpu = agent.cpu_seconds()
        steady_minutes = (time.monotonic() - warm_at) / 60
        hwm = agent.hwm_kib()
        values = agent.metrics()
    last_third = [s["rss_kib"] for s in series[len(series) * 2 // 3 :]] or [0]
    return {
        "ready_s": round(ready, 2),
        "first_window_s": round(first_window, 2),
        "settled_s": round(settled, 2),
        "startup_cpu_s": warm_cpu,
        "steady_minutes": round(steady_minutes, 2),
        "steady_cpu_s_per_min": round((total_cpu - warm_cpu) / steady_minutes, 3),
        "total_cpu_s": total_cpu,
        "rss_steady_mib": mib(statistics.median(last_third)),
        "rss_end_mib": mib(series[-1]["rss_kib"]) if series else 0,
        "rss_peak_mib": mib(hwm),
        "children_peak_rss_mib": mib(child_peak_kib),
        "samples_total": metric(values, "strobe_samples_total"),
        "windows_total": metric(values, "strobe_windows_total"),
        "series": series,
    }


def run_tool(argv: list[str], seconds: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a profiler to completion: rusage totals plus steady CPU from /proc."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    marks: dict[str, float] = {}
    for name, fraction in (("at40", 0.4), ("at90", 0.9)):
        time.sleep(max(0.0, started + seconds * fraction - time.monotonic()))
        marks[name] = tree_cpu_seconds(proc.pid)
        marks[name + "_t"] = time.monotonic()
    rss_at90 = status_kib(proc.pid, "VmRSS")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {stderr[-2000:]}")
    steady = (marks["at90"] - marks["at40"]) / ((marks["at90_t"] - marks["at40_t"]) / 60)
    return {
        "argv": " ".join(argv),
        "wall_s": round(time.monotonic() - started, 1),
        "total_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "steady_cpu_s_per_min": round(steady, 3),
        "rss_during_mib": mib(rss_at90),
        "rss_peak_mib": mib(usage.ru_maxrss),  # kilobytes on Linux
    }


def bcc_environment(workdir: Path) -> dict[str, str]:
    """BCC_KERNEL_SOURCE as the agent would pick it (this host may lack matching headers)."""
    from agent.sampler.kernel_headers import find_kernel_headers

    return find_kernel_headers(cache_dir=workdir / "cache").bcc_environment()


def compare(workdir: Path, hz: int, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    tool = shutil.which("profile-bpfcc") or "/usr/sbin/profile-bpfcc"
    if os.path.exists(tool):
        argv = [tool, "-F", str(hz), "-af", str(int(seconds))]
        results["profile-bpfcc"] = run_tool(argv, seconds, bcc_environment(workdir))
    perf = shutil.which("perf")
    if perf:
        data = str(workdir / "perf.data")
        argv = [perf, "record", "-a", "-F", str(hz), "-g", "-q", "-o", data]
        results["perf record"] = run_tool([*argv, "--", "sleep", str(seconds)], seconds)
        results["perf record"]["data_mib"] = mib(os.path.getsize(data) / 1024)
    return results


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long Strobe runs")
    parser.add_argument("--frequency", type=int, default=19, help="Hz, all three profilers")
    parser.add_argument("--idle", type=int, default=198, help="idle processes")
    parser.add_argument("--busy", type=int, default=2, help="busy processes")
    parser.add_argument("--busy-nice", type=int, default=19, help="nice of the busy ones")
    parser.add_argument("--compare-seconds", type=float, default=60.0, help="bcc, perf runs")
    parser.add_argument("--no-compare", action="store_true", help="Strobe only")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.compare_seconds = 1.5, 20.0
    require_root()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    with scratch("footprint") as workdir, Crowd() as crowd:
        host(crowd, build_workload(workdir), args.idle, args.busy, args.busy_nice)
        processes = len(pids())
        strobe = run_strobe(workdir, args.frequency, args.minutes * 60)
        others = {} if args.no_compare else compare(workdir, args.frequency, args.compare_seconds)
    emit(
        "footprint",
        {
            "settings": vars(args) | {"processes_on_host": processes},
            "strobe": strobe,
            "others": others,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
