from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from agent import metrics
from agent.admin.server import AdminServer, is_loopback
from tests.conftest import metric_value


@pytest.fixture
def server() -> Iterator[AdminServer]:
    admin = AdminServer("127.0.0.1:0")
    admin.start()
    yield admin
    admin.close()


def get(admin: AdminServer, path: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{admin.port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_health_and_readiness(server: AdminServer) -> None:
    metrics.SAMPLES.inc(3)
    status, body = get(server, "/metrics")
    assert status == 200
    assert b"strobe_samples_total" in body
    assert get(server, "/healthz") == (200, b"ok\n")
    assert get(server, "/readyz")[0] == 503
    server.set_ready()
    assert get(server, "/readyz")[0] == 200
    assert get(server, "/nope")[0] == 404


def test_token_is_required_when_set() -> None:
    admin = AdminServer("127.0.0.1:0", token="s3cret")
    admin.start()
    try:
        assert get(admin, "/metrics")[0] == 401
        assert get(admin, "/metrics", token="wrong")[0] == 401
        assert get(admin, "/metrics", token="s3cret")[0] == 200
        assert get(admin, "/healthz")[0] == 200  # kubelet probes carry no token
        assert get(admin, "/readyz")[0] == 503  # not ready yet, but not 401 either
    finally:
        admin.close()


def test_a_failing_route_answers_500_and_the_server_lives(server: AdminServer) -> None:
    def broken(_query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        raise RuntimeError("bug")

    server.routes["/broken"] = broken
    assert get(server, "/broken")[0] == 500
    assert get(server, "/healthz")[0] == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_pprof_routes_need_a_token_even_on_loopback_and_without_one(server: AdminServer) -> None:
    server.routes["/debug/pprof/profile"] = lambda _query: (200, "text/plain", b"stacks\n")
    assert get(server, "/debug/pprof/profile")[0] == 401  # no token set: refused, not open
    assert get(server, "/metrics")[0] == 200  # the rest stays open on loopback
    admin = AdminServer("127.0.0.1:0", token="s3cret", open_paths=frozenset({"/metrics"}))
    admin.routes["/debug/pprof/profile"] = server.routes["/debug/pprof/profile"]
    admin.start()
    try:
        assert get(admin, "/metrics")[0] == 200
        assert get(admin, "/debug/pprof/profile")[0] == 401
        assert get(admin, "/debug/pprof/profile", token="s3cre")[0] == 401
        assert get(admin, "/debug/pprof/profile", token="s3cret") == (200, b"stacks\n")
    finally:
        admin.close()


def test_idle_connections_are_bounded_and_dropped() -> None:
    import socket
    import threading
    import time

    admin = AdminServer("127.0.0.1:0", max_connections=8, idle_seconds=1.0)
    admin.start()
    baseline = threading.active_count()
    refused_before = metric_value(metrics.HTTP_CONNECTIONS_REFUSED)
    idle = [socket.create_connection(("127.0.0.1", admin.port)) for _ in range(200)]
    try:
        deadline = time.monotonic() + 10
        while metric_value(metrics.HTTP_CONNECTIONS_REFUSED) - refused_before < 150:
            assert threading.active_count() <= baseline + 8  # not a thread per socket
            assert time.monotonic() < deadline, "connections over the bound were not closed"
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.1)  # the idle ones time out and free their slots
        assert threading.active_count() == baseline
        assert get(admin, "/healthz")[0] == 200  # served again once the idle ones left
    finally:
        for sock in idle:
            sock.close()
        admin.close()
