"""Where finished profiles go: the local store (default), remote stores.

Every sink takes whole SeriesProfiles, one call per profile, from the window loop.
"""

from __future__ import annotations

from typing import Protocol

from agent.model import SeriesProfile


class Sink(Protocol):
    """A destination for profiles. `name` is the `sink` label of the sink metrics."""

    name: str

    def write(self, profile: SeriesProfile) -> object:
        """Store or ship one profile. Must not block the window loop for long; what it
        returns (e.g. the file written) is informational and callers may ignore it."""
        ...

    def problem(self) -> str | None:
        """Why the sink cannot take profiles now (one line), or None when it can."""
        ...

    def close(self) -> int:
        """Flush what can be flushed and release resources; later writes are an error.
        Returns how many profiles were lost (neither stored nor shipped nor spooled)."""
        ...
