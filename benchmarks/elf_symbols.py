"""Reading one binary's function symbols: time, peak and retained memory.

Each binary is read (agent.elf.reader.ElfInfo.read, as the symbolizer does on first
sight of a binary) in a fresh child process, which reports the parse time, its RSS
before and after (after a gc), and its peak RSS. "Retained" is after - before: what
the agent grows by for keeping that binary's table, allocator leftovers included.
Defaults: the largest symbol tables on this machine (node, libLLVM, libjvm).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _harness import PYTHON, REPO, base_parser, emit

DEFAULT_BINARIES = [
    "/usr/bin/node",
    "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
    "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
]
CHILD = """
import gc, json, resource, sys, time
from agent.elf.reader import ElfInfo
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
before = rss()
started = time.perf_counter()
info = ElfInfo.read(sys.argv[1])
seconds = time.perf_counter() - started
gc.collect()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"symbols": len(info.symbols), "seconds": round(seconds, 3),
    "retained_mib": round(rss() - before, 1), "peak_over_start_mib": round(peak - before, 1)}))
"""


def measure(binary: str) -> dict[str, object]:
    out = subprocess.run(
        [str(PYTHON), "-c", CHILD, binary], cwd=REPO, capture_output=True, text=True, check=True
    )
    return {"binary": binary, **json.loads(out.stdout)}


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("binaries", nargs="*", default=DEFAULT_BINARIES)
    args = parser.parse_args()
    present = [b for b in args.binaries if Path(b).exists()]
    if not present:
        sys.exit("none of the binaries exists here")
    results = [measure(binary) for binary in present]
    for row in results:
        print(row, flush=True)
    emit("elf_symbols", {"binaries": results}, args.json)


if __name__ == "__main__":
    main()
