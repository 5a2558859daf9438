"""Signals that arrive before `strobe run` has its own handlers (imports, config, the
BPF load: seconds on a busy node) are remembered instead of killing the agent: a
SIGHUP then reloads and a SIGTERM or SIGINT stops, once the daemon is up."""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_pending: set[int] = set()


def install() -> None:
    for signum in HANDLED:
        signal.signal(signum, _remember)


def _remember(signum: int, _frame: FrameType | None) -> None:
    _pending.add(signum)


def take(signum: int) -> bool:
    """Whether `signum` arrived early (and forget it)."""
    if signum in _pending:
        _pending.discard(signum)
        return True
    return False
