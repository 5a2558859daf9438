"""End to end: `strobe run --kubeconfig` labels a busy process in a pod-like cgroup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.labels.k8s_fake import TOKEN, FakeApiServer, WatchStep
from tests.labels.test_label_real_cgroups import cgroup_mounts, recorded_checkout


def write_kubeconfig(path: Path, server: str) -> None:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: test\n  cluster:\n    server: {server}\n"
        f"users:\n- name: agent\n  user:\n    token: {TOKEN}\n"
        "contexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\n"
        "current-context: test\n"
    )


def test_agent_series_carry_pod_labels(
    require_bpf: None, api_server: FakeApiServer, c_binaries: Path, tmp_path: Path
) -> None:
    uid, container_id = recorded_checkout()
    pod_slice = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    relative = (
        f"strobe-e2e-{os.getpid()}/kubepods.slice/kubepods-burstable.slice/"
        f"{pod_slice}/cri-containerd-{container_id}.scope"
    )
    leaf = cgroup_mounts()["v2"] / relative
    leaf.mkdir(parents=True)
    api_server.watch_steps.put(WatchStep(then="hold"))
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, api_server.url)
    store = tmp_path / "store"
    workload = subprocess.Popen([str(c_binaries / "spin_pie"), "120"])
    agent = None
    try:
        (leaf / "cgroup.procs").write_text(str(workload.pid))
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--window",
                "2s",
                "--local-store",
                str(store),
                "--http-address",
                "127.0.0.1:0",
                "--kubeconfig",
                str(kubeconfig),
                "--node-name",
                "worker-1",
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        found = None
        deadline = time.monotonic() + 90
        while found is None and time.monotonic() < deadline:
            assert agent.poll() is None, agent.communicate()[1]
            for sidecar in store.glob("*.json"):
                try:
                    labels = json.loads(sidecar.read_text())["labels"]
                except (OSError, ValueError):
                    continue
                if labels.get("comm") == "spin_pie" and "pod" in labels:
                    found = labels
            time.sleep(0.5)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=60)
        assert agent.returncode == 0, stderr
    finally:
        for proc in (workload, agent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in [leaf, *leaf.relative_to(cgroup_mounts()["v2"]).parents][:-1]:
            full = cgroup_mounts()["v2"] / path if path != leaf else leaf
            for _ in range(50):
                try:
                    full.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    assert found == {
        "node": "worker-1",
        "namespace": "shop",
        "pod": "checkout-7c9f8d6b5-x2x9k",
        "container": "envoy",
        "container_id": container_id,
        "comm": "spin_pie",
    }, found
