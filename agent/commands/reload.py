"""SIGHUP: re-read the configuration and apply what can change without a restart.

Applied live: relabel_configs, max_series_per_window, log_level and the local store's
retention. Anything else that changed is logged as needing a restart. A config that
fails validation is logged and ignored: the agent keeps running on the old one.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from agent.commands import early_signals
from agent.config import Config, ConfigError
from agent.labels.guard import CardinalityGuard
from agent.labels.labeler import Labeler
from agent.sinks.local_store import LocalStore

log = logging.getLogger(__name__)

LIVE_FIELDS = frozenset(
    {
        "relabel_configs",
        "max_series_per_window",
        "log_level",
        "local_store_max_bytes",
        "local_store_max_age",
        "http_token_file",
    }
)


def changed_fields(old: Config, new: Config) -> set[str]:
    return {name for name in new.values if new.values[name] != old.values.get(name)}


LOAD_TIMEOUT_SECONDS = 5.0


def load_with_timeout(load: Callable[[], Config], timeout: float) -> Config:
    """`load()` on its own thread: the window loop calls this, and a config path that
    blocks (a FIFO, a hung network mount) must not stall sampling."""
    result: list[Config | BaseException] = []

    def run() -> None:
        try:
            result.append(load())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name="config-reload", daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:  # left blocked: a daemon thread, it never holds the exit
        raise ConfigError(f"reading the configuration took over {timeout:g} s (a FIFO?)")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@dataclass
class LiveParts:
    """What a reload may touch."""

    labeler: Labeler
    guard: CardinalityGuard
    local_store: LocalStore | None
    # Re-reads the admin token (a rotated file takes effect); raises ConfigError if unusable.
    reload_token: Callable[[Config], None] | None = None


def apply_live(new: Config, parts: LiveParts, fields: set[str]) -> None:
    if "relabel_configs" in fields:
        parts.labeler.set_relabel_configs(new.relabel_configs)
    if "max_series_per_window" in fields:
        parts.guard.max_series = new.max_series_per_window
    if "log_level" in fields:
        logging.getLogger().setLevel(new.log_level.upper())
    if parts.local_store is not None:
        parts.local_store.max_bytes = new.local_store_max_bytes
        parts.local_store.max_age_seconds = new.local_store_max_age


class Reloader:
    """Turns SIGHUP into a flag; the window loop calls maybe_reload() between windows."""

    def __init__(self, current: Config, load: Callable[[], Config], parts: LiveParts) -> None:
        self.current = current
        self._load = load
        self._parts = parts
        self._requested = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGHUP, self._on_sighup)
        if early_signals.take(signal.SIGHUP):
            self.request()

    def _on_sighup(self, _signum: int, _frame: FrameType | None) -> None:
        self._requested.set()

    def request(self) -> None:
        self._requested.set()

    def _reload_token(self, new: Config) -> None:
        if self._parts.reload_token is None:
            return
        try:
            self._parts.reload_token(new)
        except ConfigError as exc:
            log.error("reload: %s; keeping the current admin token", exc)

    def maybe_reload(self) -> bool:
        """Reload if SIGHUP arrived; True when a new config was applied."""
        if not self._requested.is_set():
            return False
        self._requested.clear()
        try:
            new = load_with_timeout(self._load, LOAD_TIMEOUT_SECONDS)
        except ConfigError as exc:
            log.error("reload: %s; keeping the current configuration", exc)
            return False
        fields = changed_fields(self.current, new)
        live = fields & LIVE_FIELDS
        apply_live(new, self._parts, live)
        self._reload_token(new)
        for name in sorted(fields - LIVE_FIELDS):
            log.warning("reload: %s changed; it takes effect after a restart", name)
        self.current = self.current.with_values(**{name: new.values[name] for name in live})
        log.info("reload: applied %s", ", ".join(sorted(live)) or "nothing (no live changes)")
        return True
