"""`strobe run`: the long-lived agent. Composes the stages, runs one window after another,
hands each window's profiles to the sinks, and serves the admin HTTP endpoints.

Threads: the main thread samples and builds windows; the admin server answers HTTP; the
indexer builds symbol indexes. SIGTERM/SIGINT end the current window early, flush it to
the sinks, and exit 0.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from agent import metrics
from agent.admin.pull import PullEndpoint
from agent.admin.server import UNAUTHENTICATED_PATHS, AdminServer, is_loopback
from agent.admin.taps import TapSet, merge_windows
from agent.admin.token import AdminToken, admin_token
from agent.commands import early_signals, startup_priority
from agent.commands.reload import LiveParts, Reloader
from agent.config import Config, ConfigError, split_host_port
from agent.model import CPU, OFF_CPU, SeriesProfile, Window
from agent.pipeline import Pipeline, build_pipeline
from agent.sinks import Sink, remote
from agent.sinks.local_store import LocalStore
from agent.sinks.remote import RemoteStoreConfig
from agent.util import sdnotify
from agent.window_flow import window_profiles

log = logging.getLogger(__name__)


def check_http_exposure(config: Config) -> None:
    """Loopback by default; anything else needs a bearer token file."""
    host, _ = split_host_port(config.http_address, listening=True)
    if not is_loopback(host) and not config.http_token_file:
        raise ConfigError(
            f"http_address: {config.http_address} is not a loopback address; "
            "set http_token_file to require a bearer token, or bind 127.0.0.1"
        )


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
    if config.remote_store_address:
        try:
            sinks.append(remote.RemoteSink(remote_store_config(config)))  # imports grpc
        except ValueError as exc:  # unreadable TLS file, unusable spool dir
            raise ConfigError(f"remote_store: {exc}") from None
    return sinks


def remote_store_config(config: Config) -> RemoteStoreConfig:
    try:
        return RemoteStoreConfig(
            address=config.remote_store_address,
            protocol=config.remote_store_protocol,
            insecure=config.remote_store_insecure,
            insecure_skip_verify=config.remote_store_insecure_skip_verify,
            ca_file=config.remote_store_ca_file,
            cert_file=config.remote_store_cert_file,
            key_file=config.remote_store_key_file,
            bearer_token_file=config.remote_store_bearer_token_file,
            headers=dict(config.remote_store_headers),
            timeout_seconds=config.remote_store_timeout,
            max_message_bytes=config.remote_store_max_message_bytes,
            queue_max_bytes=config.remote_store_queue_max_bytes,
            spool_dir=config.remote_store_spool_dir,
            spool_max_bytes=config.remote_store_spool_max_bytes,
            node=config.resolved_node_name,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class Signals:
    """SIGTERM/SIGINT set `stop`; the window loop waits on it."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            if early_signals.take(signum):
                self._stop(signum, None)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: flushing the current window", signal.Signals(signum).name)
        self.stop.set()


def sinks_problem(sinks: list[Sink]) -> str | None:
    """Why no sink can take a profile now, or None while at least one can. Each sink's
    state is also the gauge strobe_sink_ready{sink}."""
    problems = []
    for sink in sinks:
        problem = sink.problem()
        metrics.SINK_READY.labels(sink=sink.name).set(problem is None)
        problems.append(problem)
    if all(problem is not None for problem in problems) and problems:
        return "; ".join(p for p in problems if p)
    return None


def deliver(sinks: list[Sink], profiles: list[SeriesProfile], window_index: int) -> None:
    for sink in sinks:
        for profile in profiles:
            try:
                sink.write(profile)
            except Exception:  # one sink's failure must not cost the others the window
                log.exception("sink %s failed on window %d", sink.name, window_index)
                metrics.SINK_ERRORS.labels(sink=sink.name, reason="exception").inc()
    sinks_problem(sinks)  # the readiness gauges follow every window


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the heap that a big window freed back to the kernel.

    glibc keeps freed heap pages for reuse, so RSS would stay at the largest window's
    high-water mark for the agent's whole life; a trim per window costs ~1 ms."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class WindowLoop:
    """Sample one window after another; drain more often while captures are open."""

    def __init__(
        self,
        pipeline: Pipeline,
        sinks: list[Sink],
        window_seconds: float,
        stop: threading.Event,
        taps: TapSet | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sinks = sinks
        self.window_seconds = window_seconds
        self.stop = stop
        self.taps = taps or TapSet()
        self.reloader = reloader
        self.delivered = 0
        self._last_watchdog = 0.0
        self._next_window_end: float | None = None  # monotonic; windows keep a cadence

    def run(self, max_windows: int | None = None) -> int:
        while True:
            window = self._sample_one_window()
            profiles = window_profiles(window, self.pipeline.stages, self.pipeline.period_ns)
            deliver(self.sinks, profiles, self.delivered)
            self.pipeline.end_window()
            samples, series = sum(s.count for s in window.samples), len(profiles)
            del window, profiles  # before the trim: they hold most of what a window built
            release_free_memory()
            if self.reloader is not None:
                self.reloader.maybe_reload()
            self.delivered += 1
            log.info("window %d: %d samples, %d series", self.delivered, samples, series)
            if self.stop.is_set() or (max_windows is not None and self.delivered >= max_windows):
                self.taps.cancel_all("the agent is stopping")
                return self.delivered

    def _keepalive(self) -> None:
        """Tell systemd's watchdog we are alive, every couple of seconds."""
        now = time.monotonic()
        if now - self._last_watchdog >= 2.0:
            self._last_watchdog = now
            sdnotify.notify(sdnotify.WATCHDOG)

    def _sample_one_window(self) -> Window:
        # Windows end on a fixed cadence, so the time spent processing one window does
        # not stretch the next (a window covers everything since the previous drain).
        now = time.monotonic()
        window_end = self._next_window_end or now + self.window_seconds
        self._next_window_end = max(window_end + self.window_seconds, now)
        drains: list[Window] = []
        while True:
            had_taps = self.taps.active()
            drain_at = self.taps.drain_by(window_end)
            while not self.stop.is_set() and time.monotonic() < drain_at:
                self.pipeline.capture_new_processes(timeout_ms=200)
                self._keepalive()
                if not had_taps and self.taps.active():
                    break  # a capture just opened: drain now so it starts clean
            drain = self.pipeline.sampler.drain()
            drains.append(drain)
            self.taps.feed(drain, self.pipeline)  # finishes the captures whose time is up
            if self.stop.is_set() or time.monotonic() >= window_end:
                merged = merge_windows(drains)
                assert merged is not None  # drains is never empty here
                return merged


def auth_of(token: AdminToken) -> tuple[str, frozenset[str]]:
    """A configured token guards every route but the probes; a generated one guards only
    /debug/pprof/*, so /metrics stays open on loopback without a secret."""
    open_paths = UNAUTHENTICATED_PATHS | {"/metrics"} if token.generated else UNAUTHENTICATED_PATHS
    return token.value, open_paths


def admin_server(config: Config, token: AdminToken) -> AdminServer:
    value, open_paths = auth_of(token)
    try:
        admin = AdminServer(config.http_address, token=value, open_paths=open_paths)
    except OSError as exc:  # in use, or an address this host does not have
        raise ConfigError(
            f"http_address {config.http_address}: {exc.strerror or exc}; stop what listens "
            "there or choose another with --http-address"
        ) from None
    log.info(
        "admin HTTP: /debug/pprof/* requires the bearer token in %s (%s)",
        token.path,
        "generated" if token.generated else "http_token_file",
    )
    return admin


def run(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    check_http_exposure(config)
    token = admin_token(config)
    admin = admin_server(config, token)  # first: a port in use stops us before any work
    sinks = build_sinks(config)
    signals = Signals()
    signals.install()
    taps = TapSet()
    kinds = frozenset({CPU, OFF_CPU} if config.off_cpu else {CPU})
    PullEndpoint(taps.capture, max_seconds=config.max_profile_seconds, kinds=kinds).register(admin)
    admin.set_readiness_check(lambda: sinks_problem(sinks))
    admin.start()
    pipeline = build_pipeline(config)
    try:
        pipeline.start()
        startup_priority.end()  # attached: the rest competes at the configured priority
        admin.set_ready()
        sdnotify.notify(sdnotify.READY)
        reloader = None
        if reload_config is not None:
            local = next((s for s in sinks if isinstance(s, LocalStore)), None)
            parts = LiveParts(
                pipeline.labeler,
                pipeline.guard,
                local,
                reload_token=lambda new: admin.set_auth(*auth_of(admin_token(new))),
            )
            reloader = Reloader(config, reload_config, parts)
            reloader.install()
        WindowLoop(pipeline, sinks, config.window, signals.stop, taps, reloader).run()
    finally:
        sdnotify.notify(sdnotify.STOPPING)
        admin.set_ready(False)
        # Before the pipeline, whose threads may take long to stop.
        lost = sum(sink.close() for sink in sinks)
        pipeline.close()
        admin.close()
    if lost:  # a supervisor should see it: systemd marks the unit failed
        print(
            f"strobe: {lost} profiles lost at shutdown: no sink could take them (the log says why)",
            file=sys.stderr,
        )
        return 1
    log.info("stopped cleanly")
    return 0
