"""The Labeler facade over a /proc tree written under tmp_path and recorded pods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.labels.kubernetes import PodCache, pod_from_json
from agent.labels.labeler import Labeler, sanitize_label_name
from agent.labels.relabel import parse_relabel_configs
from agent.metrics import REGISTRY
from agent.model import ProcessInfo
from tests.labels.k8s_fake import K8S_DATA

NODE = "worker-1"


def recorded_pod(name: str) -> dict:
    items = json.loads((K8S_DATA / "podlist.json").read_text())["items"]
    return next(p for p in items if p["metadata"]["name"] == name)


CHECKOUT = recorded_pod("checkout-7c9f8d6b5-x2x9k")
CHECKOUT_UID = CHECKOUT["metadata"]["uid"]
ENVOY_ID = next(
    s["containerID"].split("://")[1]
    for s in CHECKOUT["status"]["containerStatuses"]
    if s["name"] == "envoy"
)
ENVOY_CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
    f"{CHECKOUT_UID.replace('-', '_')}.slice/cri-containerd-{ENVOY_ID}.scope\n"
)


def fake_process(proc: Path, pid: int, start_time: int, cgroup: str, comm: str) -> ProcessInfo:
    """A /proc/PID with the two files the labeler reads, in the kernel's formats."""
    (proc / str(pid)).mkdir(parents=True)
    # comm in parentheses may itself hold ") ": fields are counted after the last ")".
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12
    stat = f"{pid} ({comm}) x) {' '.join(fields)} {start_time} 1000 200\n"
    (proc / str(pid) / "stat").write_text(stat)
    (proc / str(pid) / "cgroup").write_text(cgroup)
    return ProcessInfo(pid, start_time, comm, f"/usr/local/bin/{comm}", ())


def test_container_process_gets_pod_labels(tmp_path: Path) -> None:
    pods = PodCache()
    pods.replace_all([pod_from_json(CHECKOUT)])
    labeler = Labeler(NODE, kubernetes=pods, proc=tmp_path)
    envoy = fake_process(tmp_path, 4242, 987654, ENVOY_CGROUP, "envoy")
    labels = labeler.discovery_labels(envoy)
    assert labels == {
        "__meta_process_pid": "4242",
        "__meta_process_comm": "envoy",
        "__meta_process_executable": "/usr/local/bin/envoy",
        "__meta_process_cgroup": ENVOY_CGROUP[3:].strip(),
        "__meta_container_id": ENVOY_ID,
        "__meta_container_runtime": "containerd",
        "__meta_kubernetes_namespace": "shop",
        "__meta_kubernetes_pod_name": "checkout-7c9f8d6b5-x2x9k",
        "__meta_kubernetes_pod_uid": CHECKOUT_UID,
        "__meta_kubernetes_container_name": "envoy",
        "__meta_kubernetes_node_name": NODE,
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "checkout",
        "__meta_kubernetes_pod_label_app_kubernetes_io_version": "1.4.2",
        "__meta_kubernetes_pod_label_pod_template_hash": "7c9f8d6b5",
        "node": NODE,
    }
    assert labeler.series_labels(envoy) == (
        ("comm", "envoy"),
        ("container", "envoy"),
        ("container_id", ENVOY_ID),
        ("namespace", "shop"),
        ("node", NODE),
        ("pod", "checkout-7c9f8d6b5-x2x9k"),
    )


def test_pod_seen_later_is_picked_up(tmp_path: Path) -> None:
    pods = PodCache()
    labeler = Labeler(NODE, kubernetes=pods, proc=tmp_path)
    envoy = fake_process(tmp_path, 4242, 987654, ENVOY_CGROUP, "envoy")
    early = labeler.series_labels(envoy)
    assert (
        early is not None and "pod" not in dict(early) and dict(early)["container_id"] == ENVOY_ID
    )
    assert labeler.discovery_labels(envoy)["__meta_kubernetes_pod_uid"] == CHECKOUT_UID  # cgroup
    pods.upsert(pod_from_json(CHECKOUT))  # the watch catches up
    late = labeler.series_labels(envoy)
    assert late is not None and dict(late)["pod"] == "checkout-7c9f8d6b5-x2x9k"
    pods.remove(CHECKOUT_UID)  # pod deleted while its process is still being sampled
    assert labeler.series_labels(envoy) == late


def test_cgroupfs_runtime_comes_from_the_pod_status(tmp_path: Path) -> None:
    pods = PodCache()
    pods.replace_all([pod_from_json(CHECKOUT)])
    labeler = Labeler(NODE, kubernetes=pods, proc=tmp_path)
    cgroup = f"11:memory:/kubepods/burstable/pod{CHECKOUT_UID}/{ENVOY_ID}\n0::/\n"
    envoy = fake_process(tmp_path, 77, 5, cgroup, "envoy")
    labels = labeler.discovery_labels(envoy)
    assert labels["__meta_container_runtime"] == "containerd"
    assert labels["__meta_kubernetes_container_name"] == "envoy"


def test_reused_and_vanished_pids_get_no_cgroup_labels(tmp_path: Path) -> None:
    labeler = Labeler(NODE, proc=tmp_path)
    fake_process(tmp_path, 10, 1111, ENVOY_CGROUP, "envoy")
    reused = ProcessInfo(10, 2222, "envoy", "/usr/local/bin/envoy", ())  # another start time
    assert "__meta_container_id" not in labeler.discovery_labels(reused)
    gone = ProcessInfo(99999, 1, "gone", "/bin/gone", ())
    assert labeler.discovery_labels(gone) == {
        "__meta_process_pid": "99999",
        "__meta_process_comm": "gone",
        "__meta_process_executable": "/bin/gone",
        "node": NODE,
    }
    assert labeler.series_labels(gone) == (("comm", "gone"), ("node", NODE))


def test_an_exec_gets_the_new_images_labels(tmp_path: Path) -> None:
    labeler = Labeler(NODE, proc=tmp_path)
    shell = fake_process(tmp_path, 12, 500, "0::/\n", "sh")
    assert labeler.discovery_labels(shell)["__meta_process_executable"] == "/usr/local/bin/sh"
    # Same pid and start time after the exec; the reread ProcessInfo has a new image.
    envoy = ProcessInfo(12, 500, "envoy", "/usr/local/bin/envoy", ())
    labels = labeler.discovery_labels(envoy)
    assert (labels["__meta_process_comm"], labels["__meta_process_executable"]) == (
        "envoy",
        "/usr/local/bin/envoy",
    )


def test_relabel_drop_and_custom_rules(tmp_path: Path) -> None:
    configs = parse_relabel_configs(
        [
            {"source_labels": ["__meta_process_comm"], "regex": "kworker.*", "action": "drop"},
            {"source_labels": ["__meta_systemd_unit"], "target_label": "unit"},
            {"regex": "__meta_kubernetes_pod_label_(.+)", "action": "labelmap"},
        ]
    )
    labeler = Labeler(NODE, relabel_configs=configs, proc=tmp_path)
    kworker = fake_process(tmp_path, 3, 10, "0::/\n", "kworker/0:1")
    assert labeler.series_labels(kworker) is None
    nginx = fake_process(tmp_path, 4, 10, "0::/system.slice/nginx.service\n", "nginx")
    assert labeler.series_labels(nginx) == (("node", NODE), ("unit", "nginx.service"))
    assert Labeler(NODE, relabel_configs=[], proc=tmp_path).series_labels(nginx) == (
        ("node", NODE),
    )


def test_cache_is_bounded(tmp_path: Path) -> None:
    labeler = Labeler(NODE, proc=tmp_path, max_processes=2)
    processes = [fake_process(tmp_path, pid, 1, "0::/\n", f"p{pid}") for pid in (1, 2, 3)]
    for process in processes:
        labeler.discovery_labels(process)
    assert REGISTRY.get_sample_value("strobe_label_cache_entries") == 2.0
    # The evicted process is re-read on demand, not lost.
    assert labeler.discovery_labels(processes[0])["__meta_process_comm"] == "p1"


def test_entries_unused_for_idle_windows_are_dropped(tmp_path: Path) -> None:
    labeler = Labeler(NODE, proc=tmp_path, idle_windows=2)
    busy = fake_process(tmp_path, 1, 1, "0::/\n", "busy")
    gone = fake_process(tmp_path, 2, 1, "0::/system.slice/gone.service\n", "gone")
    labeler.series_labels(gone)
    for _ in range(3):
        labeler.series_labels(busy)
        labeler.end_window()
    assert REGISTRY.get_sample_value("strobe_label_cache_entries") == 1.0
    # Not lost: a process that runs again is read again.
    assert ("systemd_unit", "gone.service") in (labeler.series_labels(gone) or ())


@pytest.mark.parametrize(
    ("name", "sanitized"),
    [("app.kubernetes.io/name", "app_kubernetes_io_name"), ("tier", "tier"), ("a-b", "a_b")],
)
def test_sanitize_label_name(name: str, sanitized: str) -> None:
    assert sanitize_label_name(name) == sanitized
