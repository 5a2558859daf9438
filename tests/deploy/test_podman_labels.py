"""A real podman (runc) container's process is labelled with its container id."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from agent.labels.labeler import Labeler
from agent.process.reader import read_process
from tests.deploy.podman import podman_env


@pytest.fixture
def busy_container(require_bpf: None, image: str) -> Iterator[tuple[str, int]]:
    started = subprocess.run(
        [
            "podman",
            "run",
            "-d",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            image,
            "-c",
            "while :; do :; done",
        ],
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
        yield container_id, int(inspect.stdout.strip())
    finally:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "0", container_id],
            env=podman_env(),
            capture_output=True,
            timeout=120,
        )


def test_podman_container_labels(busy_container: tuple[str, int]) -> None:
    container_id, pid = busy_container
    process = read_process(pid)
    assert process is not None
    labeler = Labeler("node-a")
    labels = labeler.discovery_labels(process)
    assert labels["__meta_container_id"] == container_id
    assert labels["__meta_container_runtime"] == "podman"
    series = dict(labeler.series_labels(process) or ())
    assert series["container_id"] == container_id
    assert series["node"] == "node-a"
