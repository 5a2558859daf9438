"""On-demand profiles over HTTP: `GET /debug/pprof/profile?seconds=N[&pid=P][&type=T]`.

Speaks what Go's net/http/pprof speaks, so `pprof http://HOST:7071/debug/pprof/profile`
works: `seconds` defaults to 30, the answer is a gzipped pprof sent as an attachment.
`type` is cpu (the default) or off-cpu (blocked time; the agent must run with --off-cpu).
The capture itself (a window over the running daemon's sampler) is passed in; this
module only validates the request, allows one capture at a time and counts results.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from agent import metrics
from agent.admin.server import AdminServer, Response
from agent.model import CPU, OFF_CPU
from agent.process.reader import process_exists

log = logging.getLogger(__name__)

PATH = "/debug/pprof/profile"
DEFAULT_SECONDS = 30.0  # Go's net/http/pprof default
DEFAULT_MAX_SECONDS = 60.0  # --max-profile-seconds
PROFILE_CONTENT_TYPE = "application/octet-stream"
# Go's handler also sends these; AdminServer routes return only a content type today,
# so the daemon adds them when its server supports extra headers.
PROFILE_HEADERS = {
    "Content-Disposition": 'attachment; filename="profile"',
    "X-Content-Type-Options": "nosniff",
}

# (seconds, pid or None, kind) -> gzipped pprof of what was sampled during those seconds.
Capture = Callable[[float, int | None, str], bytes]


class BadRequest(ValueError):
    """A query the endpoint refuses; the message is sent back to the client."""


def parse_seconds(values: list[str] | None, max_seconds: float) -> float:
    if not values:
        seconds = DEFAULT_SECONDS
        if seconds > max_seconds:  # a small limit caps the default instead of refusing it
            return max_seconds
        return seconds
    try:
        seconds = float(values[-1])
    except ValueError:
        raise BadRequest(f"seconds must be a number, got {values[-1]!r}") from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > max_seconds:
        raise BadRequest(
            f"seconds must be > 0 and <= {max_seconds:g} (--max-profile-seconds), "
            f"got {values[-1]!r}"
        )
    return seconds


def parse_pid(values: list[str] | None) -> int | None:
    if not values:
        return None
    try:
        pid = int(values[-1])
    except ValueError:
        raise BadRequest(f"pid must be an integer, got {values[-1]!r}") from None
    if pid <= 0:
        raise BadRequest(f"pid must be positive, got {pid}")
    return pid


def parse_type(values: list[str] | None, kinds: frozenset[str]) -> str:
    kind = values[-1] if values else CPU
    if kind not in (CPU, OFF_CPU):
        raise BadRequest(f"type must be {CPU} or {OFF_CPU}, got {kind!r}")
    if kind not in kinds:
        raise BadRequest(f"type={kind} needs the agent to run with --off-cpu")
    return kind


def text(status: int, message: str) -> Response:
    return status, "text/plain; charset=utf-8", (message + "\n").encode()


class PullEndpoint:
    """The route for PATH. One capture at a time: a concurrent request gets 429."""

    def __init__(
        self,
        capture: Capture,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        kinds: frozenset[str] = frozenset({CPU}),
    ) -> None:
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self._capture = capture
        self._kinds = kinds  # the profile kinds the agent records
        self.max_seconds = max_seconds
        self._busy = threading.Lock()

    def register(self, server: AdminServer) -> None:
        server.routes[PATH] = self

    def __call__(self, query: dict[str, list[str]]) -> Response:
        try:
            seconds = parse_seconds(query.get("seconds"), self.max_seconds)
            pid = parse_pid(query.get("pid"))
            kind = parse_type(query.get("type"), self._kinds)
        except BadRequest as exc:
            return self._answer("bad_request", text(400, str(exc)))
        if pid is not None and not process_exists(pid):  # else: an empty profile and a 200
            return self._answer("not_found", text(404, f"process {pid} does not exist"))
        # Non-blocking: a second capture would only wait and then sample the same window.
        if not self._busy.acquire(blocking=False):
            return self._answer("busy", text(429, "a profile is already being captured"))
        try:
            data = self._capture(seconds, pid, kind)
        except Exception as exc:  # the daemon keeps running; the client learns why
            log.exception("on-demand profile capture failed")
            return self._answer("error", text(500, f"profile capture failed: {exc}"))
        finally:
            self._busy.release()
        return self._answer("ok", (200, PROFILE_CONTENT_TYPE, data, PROFILE_HEADERS))

    @staticmethod
    def _answer(result: str, response: Response) -> Response:
        metrics.PULL_REQUESTS.labels(result=result).inc()
        return response
