"""TLS (test CA, mutual TLS, skip-verify) and the bearer token, against real servers."""

from __future__ import annotations

import os

import grpc
import pytest

from agent.sinks.remote.config import TOKEN_ENV
from tests.remote.backend import make_profile, wait_until

FAILED = "strobe_remote_profiles_failed_total"
DROPPED = "strobe_remote_profiles_dropped_total"


def server_tls(certs, require_client: bool = False, odd: bool = False) -> grpc.ServerCredentials:
    key, cert = (certs.odd_key, certs.odd_cert) if odd else (certs.server_key, certs.server_cert)
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=certs.ca.read_bytes() if require_client else None,
        require_client_auth=require_client,
    )


def test_tls_with_the_test_ca(backends, sinks, certs):
    backend = backends("parca", tls=server_tls(certs))
    sink = sinks(address=backend.address, insecure=False, ca_file=str(certs.ca))
    sink.write(make_profile(1))
    assert sink.flush(60)
    assert backend.ids() == [1]


def test_tls_refuses_a_server_the_roots_do_not_vouch_for(backends, sinks, certs, delta):
    backend = backends("parca", tls=server_tls(certs, odd=True))  # self-signed, other name
    sink = sinks(address=backend.address, insecure=False, ca_file=str(certs.ca))
    sink.write(make_profile(1))
    assert wait_until(lambda: delta(FAILED, code="UNAVAILABLE") >= 2)
    assert backend.ids() == []
    assert sink.pending == 1  # kept for later, not dropped


def test_mutual_tls(backends, sinks, certs, delta):
    backend = backends("otlp", tls=server_tls(certs, require_client=True))
    without = sinks(address=backend.address, protocol="otlp", insecure=False, ca_file=str(certs.ca))
    without.write(make_profile(1))
    assert wait_until(lambda: delta(FAILED, code="UNAVAILABLE") >= 1)
    with_cert = sinks(
        address=backend.address,
        protocol="otlp",
        insecure=False,
        ca_file=str(certs.ca),
        cert_file=str(certs.client_cert),
        key_file=str(certs.client_key),
    )
    with_cert.write(make_profile(2))
    assert with_cert.flush(60)
    assert backend.ids() == [2]


def test_skip_verify_pins_whatever_certificate_the_server_shows(backends, sinks, certs):
    backend = backends("parca", tls=server_tls(certs, odd=True))  # DNS:backend.invalid only
    sink = sinks(address=backend.address, insecure=False, insecure_skip_verify=True)
    sink.write(make_profile(1))
    assert sink.flush(60)
    assert backend.ids() == [1]


def test_skip_verify_follows_a_new_certificate_after_a_restart(backends, sinks, certs):
    backend = backends("parca", tls=server_tls(certs, odd=True))
    sink = sinks(address=backend.address, insecure=False, insecure_skip_verify=True)
    sink.write(make_profile(1))
    assert sink.flush(60)
    backend.stop()
    backend.tls = server_tls(certs)  # same port, another certificate
    backend.start()
    sink.write(make_profile(2))
    assert sink.flush(60)
    assert backend.ids() == [1, 2]


def _set_token(path, token: str, generation: int) -> None:
    path.write_text(token + "\n")
    stamp = 1_700_000_000_000_000_000 + generation * 1_000_000_000  # distinct mtimes
    os.utime(path, ns=(stamp, stamp))


def test_bearer_token_file_is_enforced_and_reread(backends, sinks, tmp_path, delta):
    expected = {"token": "right-1"}
    backend = backends("parca", token=lambda: expected["token"])
    token_file = tmp_path / "token"
    _set_token(token_file, "wrong", 1)
    sink = sinks(address=backend.address, bearer_token_file=str(token_file))

    sink.write(make_profile(1))  # wrong token: UNAUTHENTICATED is permanent, dropped
    assert sink.flush(60)
    assert delta(DROPPED, reason="unauthenticated") == 1

    _set_token(token_file, "right-1", 2)
    sink.write(make_profile(2))
    assert sink.flush(60)

    expected["token"] = "right-2"  # rotation on both sides
    _set_token(token_file, "right-2", 3)
    sink.write(make_profile(3))
    assert sink.flush(60)

    assert backend.ids() == [2, 3]
    assert backend.interceptor.rejected == 1
    assert backend.recorder.metadata[-1]["authorization"] == "Bearer right-2"


def test_bearer_token_from_the_environment_and_extra_headers(
    backends, sinks, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    backend = backends("otlp", token=lambda: "from-env")
    sink = sinks(address=backend.address, protocol="otlp", headers={"x-scope-orgid": "team-a"})
    sink.write(make_profile(1))
    assert sink.flush(60)
    assert backend.ids() == [1]
    assert backend.recorder.metadata[0]["x-scope-orgid"] == "team-a"
