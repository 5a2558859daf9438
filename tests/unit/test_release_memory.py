"""release_free_memory gives freed heap pages back to the kernel (glibc malloc_trim)."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
from agent.commands.daemon import release_free_memory

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

chunks = [bytearray(2048) for _ in range(100_000)]  # ~200 MiB of malloc heap
pin = bytearray(2048)  # above them: glibc cannot shrink the heap top on its own
del chunks
freed = rss_kib()
release_free_memory()
print(freed, rss_kib())
"""


def test_freed_heap_goes_back_to_the_kernel() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    before, after = (int(n) for n in out.split())
    assert before - after > 100 * 1024, (before, after)  # > 100 MiB of the 200 returned
