"""RemoteStoreConfig validation and the retry policy."""

from __future__ import annotations

import random
import subprocess
import sys

import grpc
import pytest

from agent.sinks.remote import RemoteSink, RemoteStoreConfig
from agent.sinks.remote.channel import TokenSource, certificate_name
from agent.sinks.remote.retry import FEW, backoff_seconds, should_retry


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"address": "no-port"}, "not HOST:PORT"),
        ({"address": "host:99999"}, "port out of range"),
        ({"protocol": "pyroscope"}, "protocol"),
        ({"cert_file": "/c.pem"}, "cert_file and key_file"),
        ({"insecure": True, "ca_file": "/ca.pem"}, "insecure (plaintext) excludes"),
        ({"queue_max_bytes": 0}, "queue_max_bytes must be positive"),
        ({"headers": {"X-Org": "a"}}, "lowercase"),
    ],
)
def test_invalid_configs_are_refused_with_a_reason(fields, message):
    with pytest.raises(
        ValueError, match="remote store: .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        RemoteStoreConfig(**{"address": "127.0.0.1:7070", **fields})


def test_unreadable_tls_file_is_named_at_start(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(ValueError, match=f"ca_file: cannot read {missing}"):
        RemoteSink(RemoteStoreConfig(address="127.0.0.1:7070", ca_file=str(missing)))


def test_ipv6_address_is_accepted():
    assert RemoteStoreConfig(address="[::1]:7070").address == "[::1]:7070"


def test_retry_classification():
    assert should_retry(grpc.StatusCode.UNAVAILABLE, 1000)
    assert should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1000)
    assert should_retry(grpc.StatusCode.DEADLINE_EXCEEDED, 1)
    assert should_retry(grpc.StatusCode.INTERNAL, FEW)
    assert not should_retry(grpc.StatusCode.INTERNAL, FEW + 1)
    for code in ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"):
        assert not should_retry(grpc.StatusCode[code], 1)


def test_backoff_grows_with_jitter_up_to_the_ceiling():
    config = RemoteStoreConfig(address="h:1", backoff_initial_seconds=1, backoff_max_seconds=30)
    rng = random.Random(7)
    for retry in range(12):
        ceiling = min(30.0, 2.0**retry)
        delays = [
            backoff_seconds(config, retry, grpc.StatusCode.UNAVAILABLE, rng) for _ in range(50)
        ]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    first_exhausted = backoff_seconds(config, 0, grpc.StatusCode.RESOURCE_EXHAUSTED, rng)
    assert first_exhausted >= config.backoff_resource_exhausted_seconds / 2 > 1


def test_token_file_reread_only_when_its_mtime_changes(tmp_path):
    path = tmp_path / "token"
    path.write_text("one\n")
    tokens = TokenSource(str(path), static="ignored")
    assert tokens.token() == "one"
    path.unlink()
    assert tokens.token() == "one"  # unreadable: the last good token stays
    assert TokenSource("", static=" env ").token() == "env"


def test_certificate_name_prefers_dns_then_ip_then_cn():
    assert (
        certificate_name({"subjectAltName": (("IP Address", "10.0.0.1"), ("DNS", "a"))}, "x") == "a"
    )
    assert certificate_name({"subjectAltName": (("IP Address", "10.0.0.1"),)}, "x") == "10.0.0.1"
    assert certificate_name({"subject": ((("commonName", "cn"),),)}, "x") == "cn"
    assert certificate_name({}, "fallback") == "fallback"


def test_unusable_spool_dir_is_named_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="spool_dir: cannot use"):
        RemoteSink(
            RemoteStoreConfig(address="127.0.0.1:7070", insecure=True, spool_dir=str(blocker / "s"))
        )


def test_grpc_is_loaded_only_when_a_remote_store_is_configured(tmp_path):
    # grpc costs ~9 MiB of RSS; the default agent (local store only) must not import it.
    script = (
        "import sys\n"
        "from agent.config import Config\n"
        "from agent.commands.daemon import build_sinks\n"
        f"build_sinks(Config().with_values(local_store={str(tmp_path / 'store')!r}))\n"
        "print('grpc' in sys.modules)\n"
        f"build_sinks(Config().with_values(local_store={str(tmp_path / 'store')!r}, "
        "remote_store_address='127.0.0.1:7070', remote_store_insecure=True))\n"
        "print('grpc' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "True"], result.stderr
