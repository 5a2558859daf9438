"""Start-up beside perf and bcc's profile: seconds from spawn to the first sample possible.

Per run and tool, from the moment the process is spawned (polled every 10 ms):
- events on: /proc/PID/fd holds as many `anon_inode:[perf_event]` links as there are
  CPUs (the per-CPU sampling events are open; the same method for all three tools);
- attached (Strobe only): the stderr line "sampler attached" arrives;
- wall: until the process exits.
Tools: `strobe run` (warm; stopped 3 s after its events are on); `strobe record` at
99 Hz for 3 s with a warm program cache (one record before the runs fills it) and a cold
one (a fresh --cache-dir per run: headers merged, BPF compiled); `perf record -a -g
-F 99 -- sleep 3`; `profile-bpfcc -F 99 -f 3`. Each condition (quiet, then N busy shell
loops, each in a session of its own) runs every tool in turn, --runs times.
Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NCPU = os.cpu_count() or 1


def perf_fds(pid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(fd.path) == "anon_inode:[perf_event]"
    return count


def bcc_environment() -> dict[str, str]:
    """BCC_KERNEL_SOURCE as Strobe picks it (this VM's kernel has no matching headers)."""
    sys.path.insert(0, str(ROOT))
    from agent.sampler.kernel_headers import find_kernel_headers

    return find_kernel_headers(cache_dir=Path("/var/cache/strobe")).bcc_environment()


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Events on, attached and wall time; a daemon (`strobe run`) is stopped with SIGTERM
    3 s after its events are on, and has no wall time."""
    daemon = "run" in cmd
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    attached: list[float] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not attached and "sampler attached" in line:
                attached.append(time.monotonic() - started)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    events_on = float("nan")
    while proc.poll() is None:
        if events_on != events_on and perf_fds(proc.pid) >= NCPU:
            events_on = time.monotonic() - started
        if daemon and time.monotonic() - started > events_on + 3:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        time.sleep(0.01)
    wall = float("nan") if daemon else time.monotonic() - started
    reader.join(timeout=5)
    if proc.returncode != 0:
        print(f"warning: {cmd[0]} exited {proc.returncode}", file=sys.stderr)
    return {
        "events_on": events_on,
        "attached": attached[0] if attached else float("nan"),
        "wall": wall,
    }


def commands(out: Path) -> dict[str, list[str] | None]:
    strobe = [".venv/bin/python", "-m", "agent", "record", "--duration", "3"]
    strobe += ["--frequency", "99", "--output", str(out / "strobe.pb.gz")]
    return {
        "Strobe, warm cache": strobe,
        "Strobe, cold cache": None,  # a fresh --cache-dir per run, made in main()
        "Strobe run (the daemon), warm": [".venv/bin/python", "-m", "agent", "run"]
        + ["--frequency", "99", "--local-store", str(out / "store")]
        + ["--http-address", "127.0.0.1:0"],
        "perf record -a -g": ["perf", "record", "-q", "-a", "-g", "-F", "99"]
        + ["-o", str(out / "perf.data"), "--", "sleep", "3"],
        "bcc profile": ["/usr/sbin/profile-bpfcc", "-F", "99", "-f", "3"],
    }


def cell(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--busy", default="20,50", help="busy loops of the conditions after quiet, comma-separated"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="startup-sbs-") as tmp:
        out = Path(tmp)
        cmds = commands(out)
        warm = cmds["Strobe, warm cache"]
        assert warm is not None
        bcc_env = bcc_environment()
        measure(warm)  # fills the default program cache
        for busy in (0, *(int(n) for n in args.busy.split(","))):
            loops = [
                subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True)
                for _ in range(busy)
            ]
            try:
                results: dict[str, list[dict[str, float]]] = {name: [] for name in cmds}
                for run in range(args.runs):
                    for name, cmd in cmds.items():
                        if cmd is None:
                            cache = tempfile.mkdtemp(dir=out)
                            cmd = [*warm, "--cache-dir", cache]
                        env = bcc_env if name == "bcc profile" else None
                        results[name].append(measure(cmd, env))
                        print(f"busy={busy} run {run + 1} {name}: {results[name][-1]}", flush=True)
                        time.sleep(0.5)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            label = "quiet" if busy == 0 else f"{busy} busy"
            for name, runs in results.items():
                attached = cell([r["attached"] for r in runs]) if "Strobe" in name else "-"
                events = cell([r["events_on"] for r in runs])
                wall = cell([r["wall"] for r in runs])
                rows.append(f"| {label} | {name} | {events} | {attached} | {wall} |")
    print(f"\n{NCPU} CPUs, {args.runs} runs each: median (min-max), seconds from spawn\n")
    print('| condition | tool | perf events open | "sampler attached" | wall |')
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
