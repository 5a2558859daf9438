"""Python frames: what the walker costs in BPF, and how its profile compares with py-spy.

    sudo .venv/bin/python benchmarks/python_frames.py [--seconds 10] [--frequency 99]
    sudo .venv/bin/python benchmarks/python_frames.py --agent-cpu 60


For each CPython (pyenv's 3.8, 3.10, 3.11, 3.12, 3.13 and Debian's 3.11), one workload
runs three functions at a known split of its time (a 50 %, b 30 %, c 20 %), 20 Python
frames deep. Strobe samples it twice, with Python frames on and off, with the kernel's
BPF statistics on (kernel.bpf_stats_enabled=1): the BPF time per sample includes the
tail-called native and Python walkers. During the "on" run py-spy records the same
process at the same rate; the table gives each tool's share of samples per leaf
function. Two busy C loops run beside it throughout (a machine under load).

--agent-cpu N: 20 busy Python processes (the same workload, the interpreters in turn)
run while `strobe run` (19 Hz, the default) runs with Python frames on, then off; the
agent's CPU (its whole process tree) is measured over N seconds once it has settled.
"""

from __future__ import annotations

import argparse
import collections
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Agent  # noqa: E402

from agent.config import Config  # noqa: E402
from agent.pipeline import build_pipeline  # noqa: E402
from agent.window_flow import window_profile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = """
import sys, time
def spin(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
def a(): spin(0.005)
def b(): spin(0.003)
def c(): spin(0.002)
def deep(depth):
    if depth:
        return deep(depth - 1)
    while True:
        a(); b(); c()
deep(int(sys.argv[1]))
"""
LEAVES = ("a", "b", "c")


def interpreters() -> dict[str, str]:
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    found = {
        v: f"{root}/versions/{v}/bin/python{v.rsplit('.', 1)[0]}"
        for v in ("3.8.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0")
    }
    found["Debian 3.11"] = "/usr/bin/python3.11"
    return {name: path for name, path in found.items() if Path(path).exists()}


def strobe_run(pid: int, seconds: float, frequency: int, python: bool) -> tuple[float, dict]:
    """(BPF ns per sample, leaf Python function -> samples) of one sampling run."""
    config = Config().with_values(frequency=frequency, no_python_frames=not python, window=seconds)
    pipeline = build_pipeline(config, pid=pid, background_indexing=False)
    pipeline.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pipeline.capture_new_processes(timeout_ms=100)
        run_ns, runs = pipeline.sampler.bpf_run_stats()["on_cpu_clock"]
        window = pipeline.sampler.drain()
    finally:
        pipeline.sampler.close()
    profile = window_profile(window, pipeline.stages, pipeline.period_ns)
    pipeline.close()
    leaves: collections.Counter[str] = collections.Counter()
    for sample in profile.samples if profile else ():
        python_names = [
            loc.frames[0].function for loc in sample.locations if loc.frame_type == "cpython"
        ]
        leaves[first_leaf(python_names)] += sample.count
    return (run_ns / runs if runs else 0.0), dict(leaves)


def first_leaf(names_leaf_first: list[str]) -> str:
    """The innermost of a, b, c in a stack (they all call spin)."""
    return next((name for name in names_leaf_first if name in LEAVES), "(other)")


def py_spy_leaves(output: Path) -> dict[str, int]:
    leaves: collections.Counter[str] = collections.Counter()
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        names = [frame.split(" (", 1)[0] for frame in reversed(stack.split(";"))]
        leaves[first_leaf(names)] += int(count)
    return dict(leaves)


def shares(leaves: dict[str, int]) -> str:
    total = sum(leaves.values()) or 1
    return " / ".join(f"{100 * leaves.get(name, 0) / total:.0f}" for name in LEAVES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--frequency", type=int, default=99)
    parser.add_argument("--agent-cpu", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.agent_cpu:
        agent_cpu(args.agent_cpu)
        return
    subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
    burners = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(2)]
    print("| CPython | BPF µs/sample, frames on | off | a/b/c % Strobe | a/b/c % py-spy |")
    print("|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as directory:
            for name, executable in interpreters().items():
                print(measure(name, executable, Path(directory), args), flush=True)
    finally:
        for burner in burners:
            burner.kill()
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"], check=False)


def measure(name: str, executable: str, directory: Path, args: argparse.Namespace) -> str:
    workload = subprocess.Popen([executable, "-c", WORKLOAD, "20"])
    spy_output = directory / f"{workload.pid}.txt"
    try:
        time.sleep(0.5)
        spy = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "py-spy"), "record", "--pid", str(workload.pid)]
            + ["--duration", str(int(args.seconds)), "--rate", str(args.frequency)]
            + ["--format", "raw", "--output", str(spy_output), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        on_ns, on_leaves = strobe_run(workload.pid, args.seconds, args.frequency, True)
        spy.wait(timeout=args.seconds + 30)
        off_ns, _ = strobe_run(workload.pid, args.seconds, args.frequency, False)
    finally:
        workload.kill()
        workload.wait()
    spy_leaves = py_spy_leaves(spy_output) if spy_output.exists() else {}
    return (
        f"| {name} | {on_ns / 1000:.1f} | {off_ns / 1000:.1f} | "
        f"{shares(on_leaves)} | {shares(spy_leaves)} |"
    )


def agent_cpu(seconds: float, processes: int = 20) -> None:
    executables = list(interpreters().values())
    crowd = [
        subprocess.Popen([executables[n % len(executables)], "-c", WORKLOAD, "20"])
        for n in range(processes)
    ]
    print(f"| Python frames | agent CPU, % of a core, {processes} busy Python processes |")
    print("|---|---|")
    try:
        for on in (True, False):
            with tempfile.TemporaryDirectory() as workdir:
                extra = [] if on else ["--no-python-frames"]
                with Agent(Path(workdir), frequency=19, extra=extra) as agent:
                    agent.wait_ready()
                    agent.wait_settled()
                    before, start = agent.cpu_seconds(), time.monotonic()
                    time.sleep(seconds)
                    used = agent.cpu_seconds() - before
                    share = 100 * used / (time.monotonic() - start)
            print(f"| {'on' if on else 'off'} | {share:.2f} |", flush=True)
    finally:
        for process in crowd:
            process.kill()


if __name__ == "__main__":
    main()
