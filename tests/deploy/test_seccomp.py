"""The agent's image under a runtime's default seccomp profile (which refuses bpf() without
CAP_SYS_ADMIN): one line naming the fix, seccomp included, and no traceback."""

from __future__ import annotations

import subprocess

from tests.deploy.podman import AGENT_CAPS, HOST_HEADERS, podman_env


def test_default_seccomp_profile_is_one_line_with_the_fix(require_bpf: None, image: str) -> None:
    result = subprocess.run(
        ["podman", "run", "--rm", "--pid=host", "--cap-drop=all", f"--cap-add={AGENT_CAPS}"]
        + [*HOST_HEADERS, image, "record", "--duration", "1", "-o", "/tmp/x.pb.gz"],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("strobe: not permitted to load the BPF sampler: ")
    assert "seccomp unconfined" in last and "docs/deploy.md" in last
