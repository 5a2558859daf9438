"""The admin token: configured as is, or generated private at first start; and who can pull."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.admin.pull import PATH, PullEndpoint
from agent.admin.server import AdminServer
from agent.admin.token import GENERATED_NAME, AdminToken, admin_token
from agent.commands.daemon import admin_server
from agent.config import Config, ConfigError
from tests.conftest import require_tool
from tests.unit.test_pull import FakeCapture

NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A cache dir every user may traverse, so only the token file's own mode protects it
    (pytest's tmp_path sits under a 0700 directory, which would hide a bad file mode)."""
    with tempfile.TemporaryDirectory(prefix="strobe-token-") as name:
        os.chmod(name, 0o755)
        yield Path(name) / "cache"


def config(cache_dir: Path, token_file: str = "") -> Config:
    return Config().with_values(cache_dir=str(cache_dir), http_token_file=token_file)


def test_generated_token_is_private_and_reused(cache_dir: Path) -> None:
    first = admin_token(config(cache_dir))
    assert first.generated
    assert first.path == cache_dir / GENERATED_NAME
    info = first.path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    if os.geteuid() == 0:
        assert info.st_uid == 0
    assert len(first.value) >= 32
    assert admin_token(config(cache_dir)) == first  # same token across restarts
    assert list(cache_dir.iterdir()) == [first.path]  # no temporary file left


def test_a_planted_token_file_is_refused(cache_dir: Path) -> None:
    cache_dir.mkdir()
    planted = cache_dir / GENERATED_NAME
    planted.write_text("known-to-everyone\n")
    planted.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{planted}.*mode 0600") as info:
        admin_token(config(cache_dir))
    assert "\n" not in str(info.value)
    planted.unlink()
    planted.symlink_to(cache_dir / "elsewhere")
    with pytest.raises(ConfigError, match="not a regular file"):
        admin_token(config(cache_dir))


def test_a_configured_token_file_is_used_as_is(cache_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  configured-secret \n")
    token_file.chmod(0o644)  # the operator's choice: not checked, not rewritten
    token = admin_token(config(cache_dir, str(token_file)))
    assert token == AdminToken("configured-secret", token_file, generated=False)
    assert not cache_dir.exists()  # nothing generated


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\xff\xfe tok\n", "is not UTF-8 text"), (b" \n", "is empty")],
)
def test_a_bad_configured_token_file_is_one_line_naming_it(
    tmp_path: Path, content: bytes, message: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        admin_token(config(tmp_path / "cache", str(token_file)))
    assert str(info.value) == f"http_token_file: {token_file} {message}"


def fetch(port: int, path: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_generated_token_guards_only_pprof(cache_dir: Path) -> None:
    token = admin_token(config(cache_dir))
    admin = admin_server(config(cache_dir).with_values(http_address="127.0.0.1:0"), token)
    PullEndpoint(FakeCapture(), max_seconds=60).register(admin)
    admin.start()
    try:
        assert fetch(admin.port, "/metrics") == 200
        assert fetch(admin.port, "/healthz") == 200
        assert fetch(admin.port, "/readyz") == 503  # not ready, but not refused
        assert fetch(admin.port, f"{PATH}?seconds=1") == 401
        assert fetch(admin.port, f"{PATH}?seconds=1", "wrong") == 401
        assert fetch(admin.port, f"{PATH}?seconds=1", token.value) == 200
    finally:
        admin.close()


def test_configured_token_still_guards_metrics(tmp_path: Path) -> None:
    token = AdminToken("s3cret", tmp_path / "token", generated=False)
    admin = admin_server(Config().with_values(http_address="127.0.0.1:0"), token)
    admin.start()
    try:
        assert fetch(admin.port, "/metrics") == 401
        assert fetch(admin.port, "/metrics", "s3cret") == 200
        assert fetch(admin.port, "/healthz") == 200
    finally:
        admin.close()


def curl_as_nobody(url: str, *headers: str) -> subprocess.CompletedProcess[str]:
    """curl run as nobody with no capabilities: what any local user can do."""
    args = [require_tool("setpriv"), *NOBODY, require_tool("curl"), "-s", "-o", "/dev/null"]
    for header in headers:
        args += ["-H", header]
    return subprocess.run(
        [*args, "-w", "%{http_code}", url], capture_output=True, text=True, timeout=60
    )


def test_a_local_user_pulls_only_with_the_token(cache_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to nobody needs root")
    token = admin_token(config(cache_dir))
    reading = subprocess.run(
        [require_tool("setpriv"), *NOBODY, "cat", str(token.path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert reading.returncode != 0, "nobody read the token file"
    assert "Permission denied" in reading.stderr
    admin = AdminServer("127.0.0.1:0", token=token.value)
    capture = FakeCapture()
    PullEndpoint(capture, max_seconds=60).register(admin)
    admin.start()
    try:
        url = f"http://127.0.0.1:{admin.port}{PATH}?seconds=1"
        assert curl_as_nobody(url).stdout == "401"
        assert curl_as_nobody(url, "Authorization: Bearer wrong").stdout == "401"
        assert capture.calls == []
        # Root reads the file and hands the token over: then the pull works.
        assert curl_as_nobody(url, f"Authorization: Bearer {token.value}").stdout == "200"
        assert capture.calls == [(1.0, None)]
        assert curl_as_nobody(f"http://127.0.0.1:{admin.port}/healthz").stdout == "200"
    finally:
        admin.close()
