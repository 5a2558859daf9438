from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import metrics
from agent.admin.pull import PATH, PullEndpoint
from agent.admin.server import AdminServer
from agent.admin.taps import without_kernel_addresses
from agent.model import Frame, Location, Mapping, ProfileSample
from agent.pprof.builder import build_pprof, parse_pprof
from tests.conftest import require_tool

EXE = Mapping(start=0x400000, end=0x500000, offset=0, path="/usr/bin/app")
PERIOD_NS = 10_000_000  # 100 Hz
TOKEN = "pull-test-token"


def fake_profile(seconds: float, pid: int | None, kind: str = "cpu") -> bytes:
    """A real pprof, as the daemon's capture would give, with the request in the names."""
    leaf = f"work_for_{seconds:g}s_pid_{pid or 'all'}"
    samples = [
        ProfileSample(
            locations=(
                Location(0x401100, EXE, frames=(Frame(leaf, "app.c", 12),)),
                Location(0x401200, EXE, frames=(Frame("main", "app.c", 30),)),
            ),
            count=7,
            labels=(("comm", "app"), ("pid", str(pid or 1))),
            pid=pid or 1,
        )
    ]
    return build_pprof(samples, time.time_ns(), int(seconds * 1e9), PERIOD_NS)


class FakeCapture:
    """Records its calls; blocks on `release` (when given) so concurrency is deterministic."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.calls: list[tuple[float, int | None]] = []
        self.started = threading.Event()
        self.release = release

    def __call__(self, seconds: float, pid: int | None, kind: str = "cpu") -> bytes:
        self.calls.append((seconds, pid))
        self.started.set()
        if self.release is not None:
            assert self.release.wait(timeout=30), "test never released the capture"
        else:
            time.sleep(0.01)  # a capture takes time; keep it short
        return fake_profile(seconds, pid)


@pytest.fixture
def server() -> Iterator[AdminServer]:
    admin = AdminServer("127.0.0.1:0", token=TOKEN)
    admin.start()
    yield admin
    admin.close()


def get(admin: AdminServer, query: str, token: str | None = TOKEN) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{admin.port}{PATH}{query}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def pull_count(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("strobe_pull_requests_total", {"result": result})
    return value or 0.0


def test_a_profile_is_served_as_gzipped_pprof(server: AdminServer) -> None:
    capture = FakeCapture()
    PullEndpoint(capture, max_seconds=60).register(server)
    before = pull_count("ok")
    pid = os.getpid()  # a live process: a pid that names none gets 404
    status, ctype, body = get(server, f"?seconds=2&pid={pid}")
    assert status == 200
    assert ctype == "application/octet-stream"
    assert capture.calls == [(2.0, pid)]
    assert body[:2] == b"\x1f\x8b"
    profile = parse_pprof(body)
    names = {profile.string_table[f.name] for f in profile.function}
    assert names == {f"work_for_2s_pid_{pid}", "main"}
    assert pull_count("ok") == before + 1


def test_seconds_defaults_to_30_like_go(server: AdminServer) -> None:
    capture = FakeCapture()
    PullEndpoint(capture, max_seconds=60).register(server)
    assert get(server, "")[0] == 200
    assert capture.calls == [(30.0, None)]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?seconds=abc", b"seconds must be a number"),
        ("?seconds=0", b"<= 45"),
        ("?seconds=-3", b"<= 45"),
        ("?seconds=45.5", b"--max-profile-seconds"),
        ("?seconds=nan", b"<= 45"),
        ("?seconds=inf", b"<= 45"),
        ("?seconds=5&pid=abc", b"pid must be an integer"),
        ("?seconds=5&pid=-1", b"pid must be positive"),
    ],
)
def test_bad_queries_get_400_and_no_capture(
    server: AdminServer, query: str, message: bytes
) -> None:
    capture = FakeCapture()
    PullEndpoint(capture, max_seconds=45).register(server)
    before = pull_count("bad_request")
    status, ctype, body = get(server, query)
    assert status == 400
    assert ctype.startswith("text/plain")
    assert message in body
    assert capture.calls == []
    assert pull_count("bad_request") == before + 1


def test_a_concurrent_request_gets_429(server: AdminServer) -> None:
    release = threading.Event()
    capture = FakeCapture(release)
    PullEndpoint(capture, max_seconds=60).register(server)
    first: list[tuple[int, str, bytes]] = []
    thread = threading.Thread(target=lambda: first.append(get(server, "?seconds=1")))
    thread.start()
    try:
        assert capture.started.wait(timeout=30)
        busy_before = pull_count("busy")
        status, _, body = get(server, "?seconds=1")
        assert status == 429
        assert b"already" in body
        assert pull_count("busy") == busy_before + 1
    finally:
        release.set()
        thread.join(timeout=30)
    assert first and first[0][0] == 200
    assert len(capture.calls) == 1
    assert get(server, "?seconds=1")[0] == 200  # the lock was released


def test_a_failing_capture_answers_500_and_frees_the_endpoint(server: AdminServer) -> None:
    calls = 0

    def flaky(seconds: float, pid: int | None, kind: str = "cpu") -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("sampler is not running")
        return fake_profile(seconds, pid)

    PullEndpoint(flaky, max_seconds=60).register(server)
    status, _, body = get(server, "?seconds=1")
    assert status == 500
    assert b"sampler is not running" in body
    assert get(server, "?seconds=1")[0] == 200


def test_max_seconds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_seconds"):
        PullEndpoint(fake_profile, max_seconds=0)


def test_upstream_pprof_reads_a_pulled_profile_and_cannot_fetch_without_token(
    server: AdminServer, tmp_path: Path
) -> None:
    # Upstream pprof sends no Authorization header: it is refused, and the documented way is
    # `curl -H "Authorization: Bearer ..." URL -o FILE` then `pprof FILE`.
    pprof = require_tool("pprof")
    capture = FakeCapture()
    PullEndpoint(capture, max_seconds=60).register(server)
    env = {**os.environ, "HOME": str(tmp_path), "PPROF_TMPDIR": str(tmp_path)}
    url = f"http://127.0.0.1:{server.port}{PATH}?seconds=1"
    refused = subprocess.run(
        [pprof, "-symbolize=none", "-top", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert capture.calls == []
    status, _, body = get(server, "?seconds=1")
    assert status == 200
    saved = tmp_path / "profile.pb.gz"
    saved.write_bytes(body)
    result = subprocess.run(
        [pprof, "-symbolize=none", "-top", str(saved)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert capture.calls == [(1.0, None)]
    assert "work_for_1s_pid_all" in result.stdout
    assert "main" in result.stdout


def test_a_profile_is_served_as_an_attachment_like_go(server: AdminServer) -> None:
    PullEndpoint(FakeCapture(), max_seconds=60).register(server)
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{PATH}?seconds=1")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Disposition"] == 'attachment; filename="profile"'
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_pulled_profile_has_no_raw_kernel_address(server: AdminServer) -> None:
    named = Location(0xFFFFFFFF81A0_1234, None, frames=(Frame("do_syscall_64"),), kernel=True)
    unnamed = Location(0xFFFFFFFFC0DE_0042, None, kernel=True)
    user = Location(0x401100, EXE, frames=(Frame("main", "app.c", 30),))
    samples = [ProfileSample((unnamed, named, user), 3, (("pid", "1"),), 1)]

    def capture(seconds: float, pid: int | None, kind: str = "cpu") -> bytes:
        scrubbed = without_kernel_addresses(samples)
        return build_pprof(scrubbed, time.time_ns(), int(seconds * 1e9), PERIOD_NS)

    PullEndpoint(capture, max_seconds=60).register(server)
    status, _, body = get(server, "?seconds=1")
    assert status == 200
    profile = parse_pprof(body)
    by_name = {
        profile.string_table[f.name]: f.id for f in profile.function if f.name
    }  # function id by name
    addresses = {
        (loc.line[0].function_id if loc.line else None): loc.address for loc in profile.location
    }
    assert addresses[None] == 0  # unnamed kernel frame: no address at all
    assert addresses[by_name["do_syscall_64"]] == 0  # named: its name, not its address
    assert addresses[by_name["main"]] == 0x401100  # user addresses are kept
    assert len(profile.location) == 3
    assert samples[0].locations[0].address == 0xFFFFFFFFC0DE0042  # the input is not modified
