"""Pausing the cyclic garbage collector around allocation bursts that make no cycles.

A window's drain and its profiles allocate ~100,000 tuples and small objects and free
them by reference counting. As they come they trigger the cyclic collector, whose full
passes walk the whole heap: measured at 1,000 processes and 20,000 stacks per window,
about half of the drain's CPU and a tenth of the profiles' (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Paused process-wide for the block only; left off if it was off. Nested or
    concurrent blocks are safe: only a block that found collection on turns it back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
