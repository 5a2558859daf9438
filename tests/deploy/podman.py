"""What every container test runs podman with: the image tag, the test containers.conf, and
the capabilities and host mounts the agent needs in a container."""

from __future__ import annotations

import os

from tests.conftest import REPO

IMAGE = "localhost/strobe:test"
CONTAINERS_CONF = REPO / "tests" / "deploy" / "containers.conf"
# What the agent needs on kernel >= 5.9 (see docs/deploy.md). The runtime's default seccomp
# profile allows bpf() and perf_event_open() only with CAP_SYS_ADMIN, so it is lifted here
# (the Helm chart's default does the same) instead of granting CAP_SYS_ADMIN.
AGENT_CAPS = "BPF,PERFMON,SYS_PTRACE,CHECKPOINT_RESTORE,SYSLOG,DAC_READ_SEARCH"
HOST_HEADERS = ["-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro"]


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
