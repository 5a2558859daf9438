"""Labels of a real process moved into real cgroups (v2 and v1) named like containers'.

Needs root (the `require_bpf` gate: in CI it fails rather than skips). The cgroups are
made under a unique top-level directory in each hierarchy and removed in teardown.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.labels.kubeconfig import ApiConnection
from agent.labels.kubernetes import KubernetesPodWatcher
from agent.labels.labeler import Labeler
from agent.model import ProcessInfo
from tests.labels.k8s_fake import K8S_DATA, TOKEN, FakeApiServer, WatchStep

NODE = "worker-1"


def cgroup_mounts() -> dict[str, Path]:
    """'v2' -> the cgroup2 mount; each v1 controller or name=... -> its hierarchy's mount."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fstype, _source, options = after.split(" ", 2)
        mount_point = Path(before.split(" ")[4])
        if fstype == "cgroup2":
            mounts.setdefault("v2", mount_point)
        elif fstype == "cgroup":
            for option in options.split(","):
                mounts.setdefault(option, mount_point)
    return mounts


def start_time_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


MoveInto = Callable[[list[tuple[str, str]]], ProcessInfo]


@pytest.fixture
def cgroup_workload(require_bpf: None) -> Iterator[MoveInto]:
    """Start `sleep` and move it into the given (hierarchy, relative path) cgroups."""
    mounts = cgroup_mounts()
    top = f"strobe-test-{secrets.token_hex(4)}"
    made: list[Path] = []
    workloads: list[subprocess.Popen[bytes]] = []

    def move_into(places: list[tuple[str, str]]) -> ProcessInfo:
        workload = subprocess.Popen(["sleep", "600"])
        workloads.append(workload)
        for hierarchy, relative in places:
            if hierarchy not in mounts:
                pytest.skip(f"this host has no {hierarchy} cgroup hierarchy")
            leaf = mounts[hierarchy] / top / relative.strip("/")
            for directory in [*reversed(leaf.relative_to(mounts[hierarchy]).parents), leaf][1:]:
                path = mounts[hierarchy] / directory
                if not path.exists():
                    path.mkdir()
                    made.append(path)
            (leaf / "cgroup.procs").write_text(str(workload.pid))
        exe = os.readlink(f"/proc/{workload.pid}/exe")
        return ProcessInfo(workload.pid, start_time_of(workload.pid), "sleep", exe, ())

    yield move_into
    for workload in workloads:
        workload.kill()
        workload.wait(timeout=30)
    for path in reversed(made):  # children first
        for _ in range(50):  # the kernel frees a cgroup a moment after its last task left
            try:
                path.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
                continue
            break
        assert not path.exists(), f"could not remove test cgroup {path}"


def recorded_checkout() -> tuple[str, str]:
    """(pod uid, envoy container id) of the recorded checkout pod."""
    items = json.loads((K8S_DATA / "podlist.json").read_text())["items"]
    pod = next(p for p in items if p["metadata"]["name"] == "checkout-7c9f8d6b5-x2x9k")
    envoy = next(s for s in pod["status"]["containerStatuses"] if s["name"] == "envoy")
    return pod["metadata"]["uid"], envoy["containerID"].split("://")[1]


def test_kubernetes_container_in_cgroup_v2(
    cgroup_workload: MoveInto, api_server: FakeApiServer
) -> None:
    uid, container_id = recorded_checkout()
    pod_slice = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    scope = f"cri-containerd-{container_id}.scope"
    relative = f"kubepods.slice/kubepods-burstable.slice/{pod_slice}/{scope}"
    process = cgroup_workload([("v2", relative)])

    api_server.watch_steps.put(WatchStep(then="hold"))
    watcher = KubernetesPodWatcher(ApiConnection(api_server.url, token=TOKEN), NODE).start()
    try:
        deadline = time.monotonic() + 20
        while len(watcher.cache) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        labeler = Labeler(NODE, kubernetes=watcher)
        labels = labeler.discovery_labels(process)
        series = labeler.series_labels(process)
    finally:
        watcher.close()

    assert labels["__meta_process_cgroup"].endswith(f"/{relative}")
    assert labels["__meta_process_pid"] == str(process.pid)
    assert labels["__meta_container_id"] == container_id
    assert labels["__meta_container_runtime"] == "containerd"
    assert "__meta_systemd_unit" not in labels  # the runtime's scope is no service
    assert labels["__meta_kubernetes_pod_uid"] == uid
    assert labels["__meta_kubernetes_namespace"] == "shop"
    assert labels["__meta_kubernetes_pod_name"] == "checkout-7c9f8d6b5-x2x9k"
    assert labels["__meta_kubernetes_container_name"] == "envoy"
    assert labels["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "checkout"
    assert series is not None and dict(series) == {
        "node": NODE,
        "namespace": "shop",
        "pod": "checkout-7c9f8d6b5-x2x9k",
        "container": "envoy",
        "container_id": container_id,
        "comm": "sleep",
    }


def test_docker_container_in_cgroup_v1(cgroup_workload: MoveInto) -> None:
    container_id = secrets.token_hex(32)
    process = cgroup_workload([("pids", f"docker/{container_id}")])
    labels = Labeler(NODE).discovery_labels(process)
    assert labels["__meta_container_id"] == container_id
    assert labels["__meta_container_runtime"] == "docker"
    assert labels["__meta_process_cgroup"].endswith(f"/docker/{container_id}")
    assert "__meta_kubernetes_pod_uid" not in labels


def test_systemd_service_in_cgroup_v2_and_crio_in_v1(cgroup_workload: MoveInto) -> None:
    unit = f"strobe-test-{secrets.token_hex(3)}.service"
    service = cgroup_workload([("v2", f"system.slice/{unit}")])
    service_labels = Labeler(NODE).series_labels(service)
    assert service_labels == (("comm", "sleep"), ("node", NODE), ("systemd_unit", unit))

    # Hybrid: a container visible only on a v1 hierarchy, while v2 holds a plain slice.
    uid = "2e4f6a8c-0b1d-4f3a-9c5e-7a9b1c3d5e7f"
    container_id = secrets.token_hex(32)
    crio = cgroup_workload(
        [
            ("v2", "user.slice"),
            ("pids", f"kubepods/besteffort/pod{uid}/crio-{container_id}.scope"),
        ]
    )
    labels = Labeler(NODE).discovery_labels(crio)
    assert labels["__meta_container_id"] == container_id
    assert labels["__meta_container_runtime"] == "cri-o"
    assert labels["__meta_kubernetes_pod_uid"] == uid
