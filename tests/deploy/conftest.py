"""Fixtures of the container tests: the agent image, built once per run."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, require_tool
from tests.deploy.podman import IMAGE, podman_env


@pytest.fixture(scope="session")
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
