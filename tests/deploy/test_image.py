"""The container image: built with podman from the Dockerfile, it profiles a host process.

Run alone with `pytest tests/deploy/test_image.py`. The first run on a machine makes the
Debian base image with debootstrap (about 30 s, then cached as a podman image); the agent
image build takes about 1-2 minutes from scratch, seconds when its layers are cached.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.pprof.builder import parse_pprof
from tests.conftest import REPO, require_tool

IMAGE = "localhost/strobe:test"
CONTAINERS_CONF = REPO / "tests" / "deploy" / "containers.conf"
# What the agent needs on kernel >= 5.9 (see docs/deploy.md). The runtime's default seccomp
# profile allows bpf() and perf_event_open() only with CAP_SYS_ADMIN, so it is lifted here
# (the Helm chart's default does the same) instead of granting CAP_SYS_ADMIN.
AGENT_CAPS = "BPF,PERFMON,SYS_PTRACE,CHECKPOINT_RESTORE,SYSLOG,DAC_READ_SEARCH"
HOST_HEADERS = ["-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro"]


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


@pytest.fixture(scope="module")
def image() -> str:
    """The agent image, built once per test run (podman reuses unchanged layers)."""
    for tool in ("podman", "buildah", "runc", "debootstrap"):
        require_tool(tool)
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh"), "--local-base", "--tag", IMAGE],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-3000:]}{build.stderr}"
    return IMAGE


def run_agent(image: str, args: list[str], podman: list[str]) -> subprocess.CompletedProcess[str]:
    command = [
        "podman",
        "run",
        "--rm",
        "--pid=host",
        "--cap-drop=all",
        f"--cap-add={AGENT_CAPS}",
        "--security-opt=seccomp=unconfined",
        # As in the Helm chart: a read-only root; /tmp, /run (tmpfs) and the image's
        # volumes /var/lib/strobe and /var/cache/strobe stay writable.
        "--read-only",
        *podman,
        image,
        *args,
    ]
    return subprocess.run(command, env=podman_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture
def host_spin(c_binaries: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A host process burning CPU in main -> outer_function -> inner_spin."""
    proc = subprocess.Popen([str(c_binaries / "spin_pie"), "120"])
    time.sleep(0.2)  # let it map its libraries
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def gnu_build_id(path: Path) -> str:
    notes = subprocess.run(
        ["readelf", "-n", str(path)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert match, f"{path} has no GNU build id"
    return match.group(1)


def test_image_runs_the_installed_agent(require_bpf: None, image: str) -> None:
    result = subprocess.run(
        ["podman", "run", "--rm", image, "--version"],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"strobe \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


def test_container_profiles_a_host_process(
    require_bpf: None,
    image: str,
    host_spin: subprocess.Popen[bytes],
    c_binaries: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["record", "--duration", "3", "--pid", str(host_spin.pid), "--output", "/out/p.pb.gz"]
    result = run_agent(image, args, [*HOST_HEADERS, "-v", f"{out}:/out"])
    assert result.returncode == 0, result.stderr
    assert host_spin.poll() is None, "the workload must still be running"
    profile = parse_pprof((out / "p.pb.gz").read_bytes())
    strings = profile.string_table
    functions = {strings[f.name] for f in profile.function}
    assert {"inner_spin", "outer_function", "main"} <= functions, functions
    # The binary is read through the host process's /proc/PID/root (or map_files): the
    # mapping carries the build id of the file on the host.
    spin = str(c_binaries / "spin_pie")
    mapping_ids = {strings[m.build_id] for m in profile.mapping if strings[m.filename] == spin}
    assert mapping_ids == {gnu_build_id(c_binaries / "spin_pie")}, mapping_ids


def test_image_headers_are_the_fallback(require_bpf: None, image: str, tmp_path: Path) -> None:
    """Without the host's /lib/modules and /usr/src, the image's own Debian headers serve."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["record", "--duration", "1", "--output", "/out/p.pb.gz"]
    result = run_agent(image, args, ["-v", f"{out}:/out"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"kernel headers: using /usr/src/linux-headers-\S+-amd64", result.stderr)
    parse_pprof((out / "p.pb.gz").read_bytes())
