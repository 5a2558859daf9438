"""Hotspots: where the agent's window loop spends its CPU (cProfile, in process).

Builds the real pipeline (agent.pipeline.build_pipeline) and runs the daemon's window
loop (agent.daemon.WindowLoop, local store sink) in this process over a crowd of
random-walk processes (`workload stacks`, nice 19). One window of warm-up runs
unprofiled (start-up compile and first indexing are not steady state); then
--windows windows run under cProfile. Only the main thread is profiled: the
background indexer thread and the admin server are not in these numbers.
Prints the top functions by own time and by cumulative time. Needs root.
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


def profile_windows(workdir: Path, hz: int, window: float, windows: int) -> pstats.Stats:
    from agent.config import Config
    from agent.daemon import WindowLoop
    from agent.pipeline import build_pipeline
    from agent.sinks import Sink
    from agent.sinks.local_store import LocalStore

    config = Config().with_values(
        frequency=hz, window=window, cache_dir=str(workdir / "cache"), node_name="bench"
    )
    pipeline = build_pipeline(config)
    sinks: list[Sink] = [LocalStore(workdir / "store", max_bytes=1 << 30, max_age_seconds=3600)]
    stop = threading.Event()
    pipeline.start()
    try:
        WindowLoop(pipeline, sinks, window, stop).run(max_windows=1)  # warm-up
        profiler = cProfile.Profile()
        profiler.enable()
        WindowLoop(pipeline, sinks, window, stop).run(max_windows=windows)
        profiler.disable()
    finally:
        pipeline.close()
        for sink in sinks:
            sink.close()
    return pstats.Stats(profiler, stream=io.StringIO())


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
        crowd.spawn([str(build_workload(workdir)), "stacks", "0"], args.processes, nice=19)
        stats = profile_windows(workdir, args.frequency, args.window, args.windows)
    total = stats.total_tt  # type: ignore[attr-defined]
    own = top_functions(stats, "tottime", args.top)
    cumulative = top_functions(stats, "cumulative", args.top)
    for title, rows in (("own time", own), ("cumulative time", cumulative)):
        print(f"--- top {args.top} by {title} (profiled total {total:.2f} s) ---")
        for row in rows:
            print(
                f"{row['own_s']:8.3f} {row['cumulative_s']:8.3f} {row['calls']:>9}  "
                f"{row['function']}"
            )
    emit(
        "hotspots",
        {
            "settings": vars(args),
            "profiled_seconds": round(total, 2),
            "by_own_time": own,
            "by_cumulative_time": cumulative,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
