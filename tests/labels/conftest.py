"""Fixtures for the label tests: the Kubernetes API double (see k8s_fake)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.labels.k8s_fake import FakeApiServer, server_tls


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def tls_api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer(tls=server_tls(require_client_cert=False)).start()
    yield server
    server.stop()
