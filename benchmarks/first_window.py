"""Whole stacks from the first window: the share of a new process's samples that reach
main in its first window, tables made only the agent's way (from pid events).

    sudo .venv/bin/python benchmarks/first_window.py [--seconds 10] [--frequency 99]

One table-unwinding sampler (as `strobe run` has) runs; each program is started under
it, pid events are handed to the unwind worker as the daemon's loop does, and the
first window of the program is drained and symbolized. Programs: an -O2 C program
without frame pointers, Debian's python3.11 (no frame pointers, .dynsym only), a Rust
release binary (rustc -O: lld, no frame pointers) and a Go binary (go build defaults).
Each is run twice: the first time its binary is new to the agent, the second time its
table is loaded already (a new process of a known binary).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.sampler import Sampler  # noqa: E402
from tests.bpf import test_unwind as unwind_test  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def programs(directory: Path) -> dict[str, tuple[list[str], set[str]]]:
    deep = directory / "deep_nofp"
    subprocess.run(
        ["gcc", "-O2", "-fomit-frame-pointer", "-o", str(deep)]
        + [str(REPO / "tests" / "data" / "c" / "deep_nofp.c")],
        check=True,
    )
    python = [unwind_test.SYSTEM_PYTHON, "-c", unwind_test.CPU_BOUND, "60"]
    return {
        "C -O2, no frame pointers": ([str(deep), "60"], {"main"}),
        "Debian python3.11": (python, {"Py_BytesMain"}),
        "Rust release (lld)": (
            [str(unwind_test.build_rust_release(directory)), "100000000"],
            {"main"},
        ),
        "Go (go build)": ([str(unwind_test.build_go(directory)), "60"], {"main.main"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--frequency", type=int, default=99)
    args = parser.parse_args()
    print("| program | first run: reach main | samples | known binary: reach main | samples |")
    print("|---|---|---|---|---|")
    with (
        tempfile.TemporaryDirectory() as directory,
        Sampler(frequency=args.frequency, unwinder="dwarf") as sampler,
    ):
        sampler.start()
        for label, (argv, outermost) in programs(Path(directory)).items():
            cells = []
            for _ in range(2):
                samples = unwind_test.first_window(sampler, argv, args.seconds)
                info = unwind_test.samples_info[samples[0].pid]
                ratio, total = unwind_test.reach_ratio(samples, info, outermost)
                cells += [f"{100 * ratio:.1f}%", str(total)]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
