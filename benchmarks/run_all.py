"""Run every benchmark in benchmarks/ with quick defaults (what `make bench` does).

Each benchmark is a script of its own (benchmarks/*.py but this one and the "_"
helpers), runnable alone with --help. A script whose --help offers --quick and --json FILE
gets them, so the whole run stays short (about 10-15 minutes on 2 CPUs) and every
result lands as JSON in --results; other scripts run with no arguments. One failing
benchmark does not stop the others; the exit status says whether all passed.
Needs root (the agent's BPF sampler).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Cheap and independent first; the longest last.
PREFERRED_ORDER = ["exporter", "startup", "overhead", "scale", "hotspots", "footprint"]


def benchmarks(only: list[str]) -> list[Path]:
    scripts = [
        path
        for path in HERE.glob("*.py")
        if path.name != Path(__file__).name and not path.name.startswith("_")
    ]
    rank = {name: index for index, name in enumerate(PREFERRED_ORDER)}
    scripts.sort(key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    return [p for p in scripts if not only or p.stem in only]


def arguments_for(script: Path, results: Path) -> list[str]:
    """--quick and --json FILE when the script's --help offers them (as flags of ours)."""
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    argv = []
    if "--quick" in help_text:
        argv.append("--quick")
    if "--json FILE" in help_text:  # not another script's bare --json switch
        argv += ["--json", str(results / f"{script.stem}.json")]
    return argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(f"/tmp/strobe-bench-{time.strftime('%Y%m%d-%H%M%S')}"),
        help="directory for the JSON results",
    )
    parser.add_argument("only", nargs="*", help="benchmark names to run (default: all)")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    for script in benchmarks(args.only):
        argv = [sys.executable, str(script), *arguments_for(script, args.results)]
        print(f"=== {script.stem}: {' '.join(argv[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.run(argv).returncode
        print(
            f"=== {script.stem}: exit {code} after {time.monotonic() - started:.0f} s", flush=True
        )
        if code != 0:
            failed.append(script.stem)
    print(f"results: {args.results}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
