"""`strobe run`: the long-lived agent. Composes the stages, runs one window after another,
hands each window's profiles to the sinks, and serves the admin HTTP endpoints.

Threads: the main thread samples and builds windows; the admin server answers HTTP.
SIGTERM/SIGINT end the current window early, flush it to the sinks, and exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from agent import metrics
from agent.admin import AdminServer, is_loopback, split_address
from agent.config import Config, ConfigError
from agent.model import SeriesProfile
from agent.pipeline import Pipeline, build_pipeline
from agent.session import window_profiles
from agent.sinks import Sink
from agent.sinks.local_store import LocalStore

log = logging.getLogger(__name__)


def check_http_exposure(config: Config) -> None:
    """Loopback by default; anything else needs a bearer token file."""
    host, _ = split_address(config.http_address)
    if not is_loopback(host) and not config.values.get("http_token_file"):
        raise ConfigError(
            f"http_address: {config.http_address} is not a loopback address; "
            "set http_token_file to require a bearer token, or bind 127.0.0.1"
        )


def read_token(config: Config) -> str | None:
    path = config.values.get("http_token_file")
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"http_token_file: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"http_token_file: {path} is empty")
    return token


def build_sinks(config: Config) -> list[Sink]:
    sinks: list[Sink] = []
    if not config.no_local_store:
        sinks.append(
            LocalStore(
                Path(config.local_store),
                max_bytes=config.local_store_max_bytes,
                max_age_seconds=config.local_store_max_age,
            )
        )
    return sinks


class StopSignal:
    """Turns SIGTERM/SIGINT into an Event the window loop waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: flushing the current window", signal.Signals(signum).name)
        self.event.set()


def deliver(sinks: list[Sink], profiles: list[SeriesProfile], window_index: int) -> None:
    for sink in sinks:
        for profile in profiles:
            try:
                sink.write(profile)
            except Exception:  # one sink's failure must not cost the others the window
                log.exception("sink %s failed on window %d", sink.name, window_index)
                metrics.SINK_ERRORS.labels(sink=sink.name, reason="exception").inc()


def run_windows(
    pipeline: Pipeline,
    sinks: list[Sink],
    window_seconds: float,
    stop: threading.Event,
    max_windows: int | None = None,
) -> int:
    """Sample, one window after another, until stopped. Returns windows delivered."""
    delivered = 0
    while True:
        deadline = time.monotonic() + window_seconds
        while not stop.is_set() and time.monotonic() < deadline:
            pipeline.capture_new_processes(timeout_ms=200)
        window = pipeline.sampler.drain()
        profiles = window_profiles(window, pipeline.stages, pipeline.period_ns)
        deliver(sinks, profiles, delivered)
        pipeline.end_window()
        delivered += 1
        log.info(
            "window %d: %d samples, %d series",
            delivered,
            sum(s.count for s in window.samples),
            len(profiles),
        )
        if stop.is_set() or (max_windows is not None and delivered >= max_windows):
            return delivered


def run(config: Config) -> int:
    check_http_exposure(config)
    token = read_token(config)
    sinks = build_sinks(config)
    admin = AdminServer(config.http_address, token=token)
    stop = StopSignal()
    stop.install()
    admin.start()
    pipeline = build_pipeline(config)
    try:
        pipeline.start()
        admin.set_ready()
        run_windows(pipeline, sinks, config.window, stop.event)
    finally:
        admin.set_ready(False)
        pipeline.close()
        for sink in sinks:
            sink.close()
        admin.close()
    log.info("stopped cleanly")
    return 0
