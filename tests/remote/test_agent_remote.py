"""The real agent shipping to real gRPC backends, configured through its flags."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.commands.cli import build_parser
from agent.commands.daemon import remote_store_config
from agent.config import build_config
from agent.pprof.proto import profile_pb2
from tests.conftest import REPO
from tests.remote.backend import Backend


def run_agent(tmp_path: Path, *flags: str, until: Callable[[], bool]) -> str:
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--window",
            "2s",
            "--http-address",
            "127.0.0.1:0",
            "--cache-dir",
            str(tmp_path / "cache"),
            *flags,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NODE_NAME": "test-node"},
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not until():
            assert agent.poll() is None, agent.communicate()[1]
            time.sleep(0.5)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, stderr
    return stderr


def test_agent_ships_parca_writeraw_and_keeps_a_local_copy(
    require_bpf: None, backends: Callable[..., Backend], c_binaries: Path, tmp_path: Path
) -> None:
    backend = backends("parca")
    workload = subprocess.Popen([str(c_binaries / "spin_pie"), "60"])
    try:
        run_agent(
            tmp_path,
            "--remote-store-address",
            backend.address,
            "--remote-store-insecure",
            "--remote-store-protocol",
            "parca",
            "--remote-store-headers",
            "x-tenant=t1",
            "--local-store",
            str(tmp_path / "store"),
            until=lambda: len(backend.recorder.requests) >= 2,
        )
    finally:
        workload.kill()
        workload.wait()
    functions: set[str] = set()
    for request in backend.recorder.requests:
        for series in request.series:
            labels = {label.name: label.value for label in series.labels.labels}
            assert labels["__name__"] == "parca_agent_cpu"
            assert labels["node"] == "test-node"
            assert "pid" not in labels
            for sample in series.samples:
                profile = profile_pb2.Profile()
                profile.ParseFromString(gzip.decompress(sample.raw_profile))
                functions |= {profile.string_table[f.name] for f in profile.function}
    assert "inner_spin" in functions
    assert all(m.get("x-tenant") == "t1" for m in backend.recorder.metadata)
    assert list((tmp_path / "store").glob("*.pb.gz")), "local store should also be written"


def test_agent_ships_otlp_without_a_local_store(
    require_bpf: None, backends: Callable[..., Backend], tmp_path: Path
) -> None:
    backend = backends("otlp")
    run_agent(
        tmp_path,
        "--remote-store-address",
        backend.address,
        "--remote-store-insecure",
        "--remote-store-protocol",
        "otlp",
        "--no-local-store",
        until=lambda: len(backend.recorder.requests) >= 1,
    )
    request = backend.recorder.requests[0]
    assert request.resource_profiles
    strings = list(request.dictionary.string_table)
    assert strings[0] == ""
    assert len(strings) > 1


def test_every_remote_flag_reaches_the_sink_config(tmp_path: Path) -> None:
    argv = [
        "run",
        "--remote-store-address",
        "backend:7070",
        "--remote-store-protocol",
        "otlp",
        "--remote-store-ca-file",
        "/ca.pem",
        "--remote-store-cert-file",
        "/c.pem",
        "--remote-store-key-file",
        "/k.pem",
        "--remote-store-bearer-token-file",
        "/token",
        "--remote-store-headers",
        "a=1,b=2",
        "--remote-store-timeout",
        "5s",
        "--remote-store-max-message-bytes",
        "1MiB",
        "--remote-store-queue-max-bytes",
        "2MiB",
        "--remote-store-spool-dir",
        str(tmp_path),
        "--remote-store-spool-max-bytes",
        "3MiB",
        "--node-name",
        "n7",
    ]
    args = build_parser().parse_args(argv)
    remote = remote_store_config(build_config(args, "run", environ={}))
    assert remote.address == "backend:7070" and remote.protocol == "otlp"
    assert not remote.insecure_skip_verify and not remote.insecure
    assert (remote.ca_file, remote.cert_file, remote.key_file) == ("/ca.pem", "/c.pem", "/k.pem")
    assert remote.bearer_token_file == "/token"
    assert dict(remote.headers) == {"a": "1", "b": "2"}
    assert remote.timeout_seconds == 5.0
    assert remote.max_message_bytes == 1024**2
    assert remote.queue_max_bytes == 2 * 1024**2
    assert remote.spool_dir == str(tmp_path) and remote.spool_max_bytes == 3 * 1024**2
    assert remote.node == "n7"
    insecure = build_parser().parse_args(
        ["run", "--remote-store-address", "b:1", "--remote-store-insecure"]
    )
    assert remote_store_config(build_config(insecure, "run", environ={})).insecure
    skip = build_parser().parse_args(
        ["run", "--remote-store-address", "b:1", "--remote-store-insecure-skip-verify"]
    )
    assert remote_store_config(build_config(skip, "run", environ={})).insecure_skip_verify
