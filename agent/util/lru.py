"""The window-based expiry that the per-process caches share."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def idle_keys(
    entries: OrderedDict[K, V], last_window: Callable[[V], int], oldest_kept: int
) -> list[K]:
    """Keys of the entries last used before window `oldest_kept`.

    `entries` must be in least-recently-used order (move_to_end on use), so the idle ones
    are a prefix: the scan stops at the first entry still in use.
    """
    idle = []
    for key, entry in entries.items():
        if last_window(entry) >= oldest_kept:
            break
        idle.append(key)
    return idle
