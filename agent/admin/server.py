"""The admin HTTP server: /metrics, /healthz, /readyz (and routes added by the daemon).

Binds 127.0.0.1 by default. The daemon refuses a non-loopback bind without a token
(see agent.commands.daemon.check_http_exposure). Routes under /debug/pprof/ always require
`Authorization: Bearer <token>` (refused outright when the server has no token); every other
route but `open_paths` requires it when a token is set. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics
from agent.config import split_host_port

log = logging.getLogger(__name__)

# Kubelet probes cannot carry a secret, and these two reveal nothing.
MAX_CONNECTIONS = 64  # concurrent admin connections; a pull holds one for its seconds
IDLE_SECONDS = 10.0  # a connection that sends nothing for this long is closed
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})
# Profiles show every process's stacks, pids, comms and paths: never served without a token,
# not even on loopback (any local user can reach loopback).
TOKEN_ONLY_PREFIX = "/debug/pprof/"

# A route gets the parsed query and returns (status, content type, body), or that plus
# extra response headers.
Response = tuple[int, str, bytes] | tuple[int, str, bytes, dict[str, str]]
Route = Callable[[dict[str, list[str]]], Response]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, but at most `max_connections` at once: more are closed
    at accept (600 idle sockets made 600 threads and 19 MB that stayed)."""

    daemon_threads = True
    request_queue_size = 128  # accept a burst, then close what is over the bound

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
    ) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            metrics.HTTP_CONNECTIONS_REFUSED.inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class AdminServer:
    """A small threaded HTTP server; routes are plain functions."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        open_paths: frozenset[str] = UNAUTHENTICATED_PATHS,
        max_connections: int = MAX_CONNECTIONS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._idle_seconds = idle_seconds
        self._token = token
        self._open_paths = open_paths
        self._ready = threading.Event()
        self._readiness_check: Callable[[], str | None] = lambda: None
        self.routes: dict[str, Route] = {
            "/metrics": lambda _query: (
                200,
                CONTENT_TYPE_LATEST,
                generate_latest(metrics.REGISTRY),
            ),
            "/healthz": lambda _query: (200, "text/plain", b"ok\n"),
            "/readyz": self._readyz,
        }
        host, port = split_host_port(address, listening=True)
        self._server = BoundedHTTPServer((host, port), self._handler_class(), max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="admin-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("admin HTTP listening on %s:%d", self._server.server_address[0], self.port)

    def set_auth(self, token: str | None, open_paths: frozenset[str]) -> None:
        """A new token (rotated file, on SIGHUP); requests from now on are checked with it."""
        self._token, self._open_paths = token, open_paths
        log.info("admin HTTP: bearer token re-read")

    def set_readiness_check(self, check: Callable[[], str | None]) -> None:
        """While ready, `check` may still say why not (a sink that refuses profiles)."""
        self._readiness_check = check

    def set_ready(self, ready: bool = True) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _readyz(self, _query: dict[str, list[str]]) -> Response:
        if not self._ready.is_set():
            return 503, "text/plain", b"not ready\n"
        problem = self._readiness_check()
        if problem is not None:
            return 503, "text/plain", f"not ready: {problem}\n".encode()
        return 200, "text/plain", b"ready\n"

    def authorized(self, header: str | None, path: str) -> bool:
        token_only = path.startswith(TOKEN_ONLY_PREFIX)
        if not token_only and (self._token is None or path in self._open_paths):
            return True
        if self._token is None:
            return False  # fail closed: no token, no profiles
        expected = f"Bearer {self._token}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = server._idle_seconds  # an idle or trickling client is dropped

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urlsplit(self.path)
                route = server.routes.get(url.path)
                headers: dict[str, str] = {}
                if route is None:
                    status, ctype, body = 404, "text/plain", b"not found\n"
                elif not server.authorized(self.headers.get("Authorization"), url.path):
                    status, ctype, body = 401, "text/plain", b"missing or wrong bearer token\n"
                else:
                    try:
                        response = route(parse_qs(url.query))
                        status, ctype, body = response[:3]
                        headers = response[3] if len(response) > 3 else {}
                    except Exception:  # a route bug must not kill the server
                        log.exception("admin route %s failed", url.path)
                        status, ctype, body = 500, "text/plain", b"internal error\n"
                path_label = url.path if route is not None else "other"
                metrics.HTTP_REQUESTS.labels(path=path_label, status=str(status)).inc()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("http: " + format, *args)

        return Handler
