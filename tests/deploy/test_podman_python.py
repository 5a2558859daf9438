"""Python frames of a process in a real podman (runc) container: its interpreter and
code are found through /proc/PID/root, although the host has another file at the path."""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.pprof.builder import parse_pprof
from tests.deploy.podman import podman_env

SCRIPT = """
def container_leaf(n):
    total = 0
    for i in range(n):
        total += i * i
    return total

def container_main():
    while True:
        container_leaf(10000)

container_main()
"""


@pytest.fixture
def python_container(require_bpf: None, image: str) -> Iterator[int]:
    started = subprocess.run(
        ["podman", "run", "-d", "--rm", "--entrypoint", "python3", image, "-c", SCRIPT],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    container_id = started.stdout.strip()
    try:
        inspect = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Pid}}", container_id],
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert inspect.returncode == 0, inspect.stderr
        yield int(inspect.stdout.strip())
    finally:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "0", container_id],
            env=podman_env(),
            capture_output=True,
            timeout=120,
        )


def test_python_frames_of_a_container_process(python_container: int, tmp_path: Path) -> None:
    output = tmp_path / "container.pb.gz"
    recorded = subprocess.run(
        [sys.executable, "-m", "agent", "record", "--pid", str(python_container)]
        + ["--duration", "3", "--frequency", "99", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert recorded.returncode == 0, recorded.stderr
    profile = parse_pprof(gzip.decompress(output.read_bytes()))
    strings = profile.string_table
    function_names = {f.id: strings[f.name] for f in profile.function}
    location_names = {
        location.id: [function_names[line.function_id] for line in location.line]
        for location in profile.location
    }
    total = named = 0
    for sample in profile.sample:
        names = [name for lid in sample.location_id for name in location_names[lid]]
        total += sample.value[0]
        if "container_leaf" in names and "container_main" in names:
            assert names.index("container_leaf") < names.index("container_main")
            named += sample.value[0]
    assert total > 100
    assert named / total >= 0.9, f"{named} of {total} samples have the Python frames"
