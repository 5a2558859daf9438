"""Fixtures of the remote-sink tests: backends on 127.0.0.1, sinks closed in teardown,
a test CA made with the openssl CLI, metric deltas."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import metrics
from agent.sinks.remote import RemoteSink, RemoteStoreConfig
from tests.conftest import require_tool
from tests.remote.backend import Backend

# Short backoff so retries happen quickly; correctness never depends on the timing.
FAST = {
    "backoff_initial_seconds": 0.02,
    "backoff_max_seconds": 0.2,
    "backoff_resource_exhausted_seconds": 0.05,
    "timeout_seconds": 20.0,
}


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """backends(protocol, tls=None, token=None) -> a Backend, started; stopped at teardown."""
    made: list[Backend] = []

    def make(protocol: str, **kwargs: Any) -> Backend:
        backend = Backend(protocol, **kwargs).start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


@pytest.fixture
def sinks() -> Iterator[Callable[..., RemoteSink]]:
    """sinks(address=..., protocol=..., **config) -> RemoteSink with FAST backoff; closed after."""
    made: list[RemoteSink] = []

    def make(**config: Any) -> RemoteSink:
        sink = RemoteSink(RemoteStoreConfig(**{"insecure": True, **FAST, **config}))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close(timeout=0)


class MetricDelta:
    """strobe_ metric values relative to a snapshot (metrics are process-global)."""

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in metrics.REGISTRY.collect()
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return (metrics.REGISTRY.get_sample_value(name, labels) or 0.0) - self._start.get(key, 0.0)


@pytest.fixture
def delta() -> MetricDelta:
    """delta("strobe_..._total", label=value): change since the test started."""
    return MetricDelta()


@dataclass(frozen=True)
class Certs:
    ca: Path  # test CA certificate
    server_cert: Path  # SAN IP:127.0.0.1, DNS:localhost, signed by ca
    server_key: Path
    client_cert: Path  # signed by ca, for mutual TLS
    client_key: Path
    odd_cert: Path  # self-signed, SAN DNS:backend.invalid only (skip-verify test)
    odd_key: Path


def _openssl(openssl: str, *args: str, cwd: Path) -> None:
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _signed(openssl: str, out: Path, name: str, san: str) -> None:
    _openssl(
        openssl,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=out,
    )
    (out / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        openssl,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=out,
    )


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    openssl = require_tool("openssl")
    out = tmp_path_factory.mktemp("tls")
    _openssl(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Strobe Test CA",
        cwd=out,
    )
    _signed(openssl, out, "server", "IP:127.0.0.1,DNS:localhost")
    _signed(openssl, out, "client", "DNS:strobe-agent")
    _openssl(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "odd.key",
        "-out",
        "odd.pem",
        "-days",
        "2",
        "-subj",
        "/CN=backend.invalid",
        "-addext",
        "subjectAltName=DNS:backend.invalid",
        cwd=out,
    )
    return Certs(
        ca=out / "ca.pem",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        client_cert=out / "client.pem",
        client_key=out / "client.key",
        odd_cert=out / "odd.pem",
        odd_key=out / "odd.key",
    )
