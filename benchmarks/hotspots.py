"""Hotspots: where the agent's window loop spends its CPU (cProfile, in process).

Builds the real pipeline (agent.pipeline.build_pipeline) and runs the daemon's window
loop (agent.commands.daemon.WindowLoop, local store sink) in this process over a crowd of
random-walk processes (`workload stacks`, SCHED_IDLE), under cProfile, in two phases:
- start-up: sampler start (BPF compile, attach), the first window, and indexing
  every binary that window asked for;
- steady: the next --windows windows, each followed by indexing what it asked for.
cProfile sees one thread, so the pipeline is built without the background indexer
thread and this script runs the same indexing (Symbolizer.prepare_pending) inline
after each window: that is where the indexer's CPU shows up here. Binaries of
processes that were never sampled are not indexed (the daemon's indexer also
prepares every captured process). Prints the top functions by own time and by
cumulative time per phase; cProfile roughly doubles the time of Python-heavy code,
so read shares, not absolute seconds. Needs root.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import threading
import time
from pathlib import Path
from typing import Any

from _harness import Crowd, base_parser, build_workload, emit, require_root, scratch


def top_functions(stats: pstats.Stats, key: str, count: int) -> list[dict[str, Any]]:
    stats.sort_stats(key)
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for func in stats.fcn_list[:count]:  # type: ignore[attr-defined]
        calls, _, own, cumulative, _ = raw[func]
        filename, line, name = func
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({name})",
                "calls": calls,
                "own_s": round(own, 3),
                "cumulative_s": round(cumulative, 3),
            }
        )
    return rows


def profile_windows(
    workdir: Path, hz: int, window: float, windows: int
) -> tuple[pstats.Stats, pstats.Stats]:
    from agent.commands.daemon import WindowLoop
    from agent.config import Config
    from agent.pipeline import build_pipeline
    from agent.sinks import Sink
    from agent.sinks.local_store import LocalStore

    config = Config().with_values(
        frequency=hz, window=window, cache_dir=str(workdir / "cache"), node_name="bench"
    )
    pipeline = build_pipeline(config, background_indexing=False)
    sinks: list[Sink] = [LocalStore(workdir / "store", max_bytes=1 << 30, max_age_seconds=3600)]
    loop = WindowLoop(pipeline, sinks, window, threading.Event())
    startup, steady = cProfile.Profile(), cProfile.Profile()
    try:
        startup.enable()
        pipeline.start()
        loop.run(max_windows=1)
        pipeline.symbolizer.prepare_pending()
        startup.disable()
        steady.enable()
        for _ in range(windows):
            loop.run(max_windows=loop.delivered + 1)
            pipeline.symbolizer.prepare_pending()
        steady.disable()
    finally:
        pipeline.close()
        for sink in sinks:
            sink.close()
    return tuple(pstats.Stats(p, stream=io.StringIO()) for p in (startup, steady))  # type: ignore[return-value]


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--processes", type=int, default=200, help="random-walk processes")
    parser.add_argument("--frequency", type=int, default=999, help="Hz")
    parser.add_argument("--window", type=float, default=10.0, help="window seconds")
    parser.add_argument("--windows", type=int, default=3, help="profiled windows")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.window, args.processes = 2, 5.0, 100
    require_root()
    started = time.monotonic()
    with scratch("hotspots") as workdir, Crowd() as crowd:
        crowd.fork([str(build_workload(workdir)), "stacks", "0"], args.processes, idle=True)
        phases = profile_windows(workdir, args.frequency, args.window, args.windows)
    result: dict[str, Any] = {"settings": vars(args)}
    for name, stats in zip(("startup", "steady"), phases, strict=True):
        result[name] = summarize(name, stats, args.top)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    emit("hotspots", result, args.json)


def summarize(phase: str, stats: pstats.Stats, top: int) -> dict[str, Any]:
    total = stats.total_tt  # type: ignore[attr-defined]
    own = top_functions(stats, "tottime", top)
    cumulative = top_functions(stats, "cumulative", top)
    for title, rows in (("own time", own), ("cumulative time", cumulative)):
        print(f"--- {phase}: top {top} by {title} (profiled total {total:.2f} s) ---")
        for row in rows:
            print(
                f"{row['own_s']:8.3f} {row['cumulative_s']:8.3f} {row['calls']:>9}  "
                f"{row['function']}"
            )
    return {
        "profiled_seconds": round(total, 2),
        "by_own_time": own,
        "by_cumulative_time": cumulative,
    }


if __name__ == "__main__":
    main()
