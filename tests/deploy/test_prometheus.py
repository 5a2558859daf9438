"""A real Prometheus scrapes a real running agent (`strobe run`) the way the deployment
docs configure it: bearer token from a file, 1 s interval, strobe_* series queried back
through Prometheus' HTTP API."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool

TOKEN = "prometheus-scrape-test-token-0123456789"
START_TIMEOUT = 180.0  # bcc compiles the sampler first
QUERY_TIMEOUT = 120.0  # the first scrape lands ~6 s after Prometheus starts


def wait_for_log(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first match of `pattern` in a growing log file; fails if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text(errors="replace"))
        if match:
            return match.group(1)
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{path.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{path.read_text()}")


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


@pytest.fixture
def workload(c_binaries: Path) -> Iterator[None]:
    """Something on CPU, so the agent has samples to count."""
    proc = subprocess.Popen([str(c_binaries / "spin_pie"), "300"])
    yield
    stop(proc)


@pytest.fixture
def agent(require_bpf: None, workload: None, tmp_path: Path) -> Iterator[Agent]:
    token_file = tmp_path / "http-token"
    token_file.write_text(TOKEN + "\n")
    log = tmp_path / "agent.log"
    command = [sys.executable, "-m", "agent", "run", "--http-address", "127.0.0.1:0"]
    command += ["--http-token-file", str(token_file), "--window", "2s"]
    command += ["--local-store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = int(wait_for_log(log, r"admin HTTP listening on 127\.0\.0\.1:(\d+)", proc, 60))
        deadline = time.monotonic() + START_TIMEOUT
        while http_get(f"http://127.0.0.1:{port}/readyz", TOKEN)[0] != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT} s\n{log.read_text()}"
            time.sleep(0.5)
        yield Agent(proc, port, log)
    finally:
        stop(proc)


@pytest.fixture
def prometheus(agent: Agent, tmp_path: Path) -> Iterator[int]:
    binary = require_tool("prometheus")
    (tmp_path / "scrape-token").write_text(TOKEN)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "strobe",
                "authorization": {"credentials_file": str(tmp_path / "scrape-token")},
                "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    command = [binary, f"--config.file={tmp_path / 'prometheus.yml'}"]
    command += [f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.listen-address=127.0.0.1:0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = wait_for_log(log, r'msg="Listening on" address=127\.0\.0\.1:(\d+)', proc, 60)
        yield int(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop(proc)


def query(prometheus_port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql}
    )
    status, body = http_get(url)
    if status != 200:
        return []
    result: list[dict[str, object]] = json.loads(body)["data"]["result"]
    return result


def wait_for_value(prometheus_port: int, promql: str) -> float:
    """The value of a one-series PromQL query once it is positive."""
    deadline = time.monotonic() + QUERY_TIMEOUT
    while time.monotonic() < deadline:
        result = query(prometheus_port, promql)
        if result:
            value = float(result[0]["value"][1])  # type: ignore[index]
            if value > 0:
                return value
        time.sleep(1)
    raise AssertionError(f"{promql} not positive within {QUERY_TIMEOUT} s")


def test_prometheus_scrapes_the_running_agent(agent: Agent, prometheus: int) -> None:
    assert wait_for_value(prometheus, 'up{job="strobe"}') == 1.0
    assert wait_for_value(prometheus, 'strobe_windows_total{job="strobe"}') >= 1
    assert wait_for_value(prometheus, 'strobe_samples_total{job="strobe"}') > 0
    # The scrape carried the token: the agent's own request counter saw /metrics succeed.
    assert wait_for_value(prometheus, 'strobe_http_requests_total{path="/metrics",status="200"}')
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=120) == 0, agent.log.read_text()


def test_scrape_without_the_token_is_refused(agent: Agent) -> None:
    status, _ = http_get(f"http://127.0.0.1:{agent.port}/metrics")
    assert status == 401
    status, body = http_get(f"http://127.0.0.1:{agent.port}/metrics", TOKEN)
    assert status == 200 and b"strobe_windows_total" in body
