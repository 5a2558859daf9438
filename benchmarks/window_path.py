"""Window path replay: the CPU a window's stacks cost in user space, on real windows, alone.

Live windows (scale.py) run beside 1,000 busy processes and the kernel's sampling, so
their timings swing by half from run to run. This script separates the two halves:
- capture (root): --processes random-walk processes (`workload stacks`, SCHED_IDLE)
  are sampled by the real sampler at --frequency for --windows windows of --window
  seconds; each drained window and the processes it names are saved as plain tuples in
  DIR/windows.pickle, with the workload binary and the symbol cache beside it;
- replay (no root needed): a fresh symbolizer (indexes from DIR's cache), labeler and
  cardinality guard process the saved windows in order --rounds times, ending a window
  between each as the daemon does. Round 1 warms the memo and is not counted.
Per window it reports the CPU seconds (time.process_time) of window_profiles: resolve +
symbolize + label + pprof, what strobe_window_processing_seconds times in the daemon.
`--keep DIR` captures into DIR and keeps it; `--load DIR` replays it again, so two
commits can be compared on the same windows (the capture's binary must stay in place:
the symbolizer checks its inode).
"""

from __future__ import annotations

import contextlib
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _harness import Crowd, base_parser, build_workload, emit, require_root, scratch

from agent.config import Config
from agent.model import Mapping, ProcessInfo, StackSample, Window

CAPTURE_FILE = "windows.pickle"
# Plain tuples only: the capture outlives the dataclasses of the commit that made it.
Captured = list[tuple[tuple[Any, ...], dict[int, tuple[Any, ...]]]]


def config_for(directory: Path, frequency: int) -> Config:
    return Config().with_values(
        frequency=frequency, cache_dir=str(directory / "cache"), node_name="bench"
    )


def capture(directory: Path, processes: int, frequency: int, windows: int, window: float) -> None:
    from agent.pipeline import build_pipeline

    binary = build_workload(directory)
    captured: Captured = []
    with Crowd() as crowd:
        crowd.fork([str(binary), "stacks", "0"], processes, idle=True)
        time.sleep(2.0)
        pipeline = build_pipeline(config_for(directory, frequency))
        pipeline.start()
        try:
            for index in range(windows + 1):  # the first is the start-up window: dropped
                end = time.monotonic() + window
                while time.monotonic() < end:
                    pipeline.capture_new_processes(timeout_ms=200)
                drained = pipeline.sampler.drain()
                infos = {}
                for sample in drained.samples:
                    info = pipeline.processes.get_covering(sample.pid, sample.user_stack)
                    if sample.pid and info is not None:
                        infos[sample.pid] = process_tuple(info)
                if index:
                    captured.append((window_tuple(drained), infos))
                pipeline.end_window()
                print(f"captured window {index}: {len(drained.samples)} stacks", file=sys.stderr)
        finally:
            pipeline.close()
    (directory / CAPTURE_FILE).write_bytes(pickle.dumps(captured))


def window_tuple(window: Window) -> tuple[Any, ...]:
    samples = tuple(
        (s.pid, s.tid, s.comm, s.user_stack, s.kernel_stack, s.count) for s in window.samples
    )
    return (window.start_ns, window.end_ns, samples)


def process_tuple(info: ProcessInfo) -> tuple[Any, ...]:
    mappings = tuple(
        (m.start, m.end, m.offset, m.path, m.dev, m.inode, m.perms) for m in info.mappings
    )
    return (info.pid, info.start_time, info.comm, info.exe, mappings, info.cmdline)


def load_capture(directory: Path) -> tuple[list[Window], dict[int, ProcessInfo]]:
    """The saved windows, and one ProcessInfo per process (as the daemon's cache keeps)."""
    captured: Captured = pickle.loads((directory / CAPTURE_FILE).read_bytes())
    windows = [
        Window(start, end, tuple(StackSample(*s) for s in samples))
        for (start, end, samples), _ in captured
    ]
    processes: dict[int, ProcessInfo] = {}
    for _, infos in captured:
        for pid, (_, start_time, comm, exe, mappings, cmdline) in infos.items():
            if pid not in processes:
                maps = tuple(Mapping(*m) for m in mappings)
                processes[pid] = ProcessInfo(pid, start_time, comm, exe, maps, cmdline)
    return windows, processes


def replay(directory: Path, frequency: int, rounds: int) -> dict[str, Any]:
    from agent.labels.guard import CardinalityGuard
    from agent.labels.labeler import Labeler
    from agent.pipeline import labeled_series
    from agent.symbolize.kallsyms import Kallsyms
    from agent.symbolize.symbolizer import Symbolizer
    from agent.window_flow import Stages, window_profiles

    windows, processes = load_capture(directory)
    config = config_for(directory, frequency)
    symbolizer = Symbolizer.from_config(config)
    symbolizer.use_kallsyms(Kallsyms.load())
    for info in processes.values():
        symbolizer.prepare(info)  # steady state: every index is ready
    labeler = Labeler("bench", config.relabel_configs)
    guard = CardinalityGuard(config.max_series_per_window)
    stages = Stages(
        resolve_process=lambda pid, _stack: processes.get(pid),
        symbolize=symbolizer.symbolize,
        series_labels=labeled_series(labeler, guard),
    )
    rows = []
    for round_ in range(rounds):
        for index, window in enumerate(windows):
            started = time.process_time()
            profiles = window_profiles(window, stages, 10**9 // frequency)
            cpu = time.process_time() - started
            symbolizer.end_window()
            labeler.end_window()
            guard.start_window()
            if round_:
                frames = sum(len(s.user_stack) + len(s.kernel_stack) for s in window.samples)
                rows.append(
                    {
                        "window": index,
                        "stacks": len(window.samples),
                        "frames": frames,
                        "series": len(profiles),
                        "cpu_s": round(cpu, 4),
                    }
                )
    symbolizer.close()
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 4)

    stacks = sum(r["stacks"] for r in rows)
    return {
        "windows_replayed": len(rows),
        "stacks_per_window": median("stacks"),
        "frames_per_window": median("frames"),
        "cpu_s": median("cpu_s"),
        "cpu_s_max": max(r["cpu_s"] for r in rows),
        "ms_per_1000_stacks": round(1e6 * sum(r["cpu_s"] for r in rows) / max(stacks, 1), 1),
        "windows": rows,
    }


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--processes", type=int, default=1000, help="random-walk processes")
    parser.add_argument("--frequency", type=int, default=1000, help="Hz")
    parser.add_argument("--window", type=float, default=10.0, help="window seconds")
    parser.add_argument("--windows", type=int, default=4, help="windows captured")
    parser.add_argument("--rounds", type=int, default=4, help="replays of all windows")
    parser.add_argument("--load", metavar="DIR", help="replay this earlier capture")
    parser.add_argument("--keep", metavar="DIR", help="keep the new capture in DIR")
    args = parser.parse_args()
    if args.quick:
        args.processes, args.windows, args.window, args.rounds = 200, 2, 5.0, 2
    result: dict[str, Any] = {"settings": vars(args)}
    if args.load:
        result["replay"] = replay(Path(args.load), args.frequency, args.rounds)
    else:
        require_root()
        with contextlib.ExitStack() as stack:
            if args.keep:  # in place: the symbolizer checks the binary's inode
                directory = Path(args.keep)
                directory.mkdir(parents=True, exist_ok=True)
            else:
                directory = stack.enter_context(scratch("window-path"))
            capture(directory, args.processes, args.frequency, args.windows, args.window)
            result["replay"] = replay(directory, args.frequency, args.rounds)
    emit("window_path", result, args.json)


if __name__ == "__main__":
    main()
