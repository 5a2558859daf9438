"""parse_cgroup on the /proc/PID/cgroup forms real hosts produce."""

from __future__ import annotations

import dataclasses

import pytest

from agent.labels.cgroup import CgroupInfo, parse_cgroup

CID = "3f4a9b2c" * 8  # 64 hex, like every runtime's container id
UID = "6a1c3e5f-7b9d-4e1f-a3c5-e7f9a1b3c5d7"
UID_ = UID.replace("-", "_")  # the systemd driver's spelling inside slice names
POD_SLICE = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"0::{POD_SLICE}/cri-containerd-{CID}.scope\n",
            CgroupInfo(
                f"{POD_SLICE}/cri-containerd-{CID}.scope",
                CID,
                "containerd",
                UID,
                f"cri-containerd-{CID}.scope",
            ),
            id="k8s-systemd-v2-containerd",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            f"/crio-{CID}.scope\n",
            CgroupInfo(
                f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                f"/crio-{CID}.scope",
                CID,
                "cri-o",
                UID,
                f"crio-{CID}.scope",
            ),
            id="k8s-systemd-v2-crio",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            CgroupInfo(
                f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
                CID,
                "containerd",
                UID,
                f"cri-containerd-{CID}.scope",
            ),
            id="k8s-guaranteed-qos",
        ),
        pytest.param(
            "".join(
                f"{n}:{c}:/kubepods/burstable/pod{UID}/{CID}\n"
                for n, c in [(12, "pids"), (11, "memory"), (4, "cpu,cpuacct"), (1, "name=systemd")]
            ),
            CgroupInfo(f"/kubepods/burstable/pod{UID}/{CID}", CID, "", UID, ""),
            id="k8s-cgroupfs-v1-runtime-unknown",
        ),
        pytest.param(
            f"0::/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice"
            f":cri-containerd:{CID}\n",
            CgroupInfo(
                f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice"
                f":cri-containerd:{CID}",
                CID,
                "containerd",
                UID,
                "containerd.service",
            ),
            id="containerd-colon-form",
        ),
        pytest.param(
            f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice"
            f"/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            CgroupInfo(
                f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice"
                f"/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
                CID,
                "containerd",
                UID,
                f"cri-containerd-{CID}.scope",
            ),
            id="kind-nested-kubelet",
        ),
        pytest.param(
            f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            CgroupInfo(
                f"/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
                CID,
                "containerd",
                UID,
                f"cri-containerd-{CID}.scope",
            ),
            id="seen-from-another-cgroup-namespace",
        ),
        pytest.param(
            f"0::/system.slice/docker-{CID}.scope\n",
            CgroupInfo(
                f"/system.slice/docker-{CID}.scope", CID, "docker", "", f"docker-{CID}.scope"
            ),
            id="docker-systemd-v2",
        ),
        pytest.param(
            f"9:name=systemd:/docker/{CID}\n8:pids:/docker/{CID}\n0::/\n",
            CgroupInfo(f"/docker/{CID}", CID, "docker", "", ""),
            id="docker-cgroupfs-hybrid",
        ),
        pytest.param(
            f"1:name=systemd:/system.slice/docker-{CID}.scope\n0::/\n",
            CgroupInfo(
                f"/system.slice/docker-{CID}.scope", CID, "docker", "", f"docker-{CID}.scope"
            ),
            id="hybrid-container-only-in-v1",
        ),
        pytest.param(
            f"0::/machine.slice/libpod-{CID}.scope/container\n",
            CgroupInfo(
                f"/machine.slice/libpod-{CID}.scope/container",
                CID,
                "podman",
                "",
                f"libpod-{CID}.scope",
            ),
            id="podman-rootful",
        ),
        pytest.param(
            f"8:pids:/libpod_parent/libpod-{CID}\n0::/libpod_parent/libpod-{CID}\n",
            CgroupInfo(f"/libpod_parent/libpod-{CID}", CID, "podman", "", ""),
            id="podman-cgroupfs-driver",
        ),
        pytest.param(
            f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope\n",
            CgroupInfo(
                f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
                CID,
                "podman",
                "",
                f"libpod-{CID}.scope",
            ),
            id="podman-rootless",
        ),
        pytest.param(
            f"0::/machine.slice/libpod-conmon-{CID}.scope\n",
            CgroupInfo(
                f"/machine.slice/libpod-conmon-{CID}.scope",
                "",
                "",
                "",
                f"libpod-conmon-{CID}.scope",
            ),
            id="podman-conmon-is-not-the-container",
        ),
        pytest.param(
            "0::/system.slice/nginx.service\n",
            CgroupInfo("/system.slice/nginx.service", systemd_unit="nginx.service"),
            id="systemd-service",
        ),
        pytest.param(
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            CgroupInfo(
                "/user.slice/user-1000.slice/session-2.scope", systemd_unit="session-2.scope"
            ),
            id="login-session",
        ),
        pytest.param(
            "4:memory:/process_api/9fb199aa3c9cfe138bb3bd710b6b0c11\n1:name=systemd:/\n0::/\n",
            CgroupInfo("/process_api/9fb199aa3c9cfe138bb3bd710b6b0c11"),
            id="short-hex-is-not-a-container",
        ),
        pytest.param(
            "1:name=systemd:/system.slice/cron.service\n0::/\n",
            CgroupInfo("/system.slice/cron.service", systemd_unit="cron.service"),
            id="hybrid-unit-from-named-systemd-hierarchy",
        ),
        pytest.param("0::/\n", CgroupInfo("/"), id="root"),
        pytest.param("", CgroupInfo(), id="empty"),
        pytest.param("garbage\n::\n1:cpu:relative\n", CgroupInfo(), id="malformed"),
    ],
)
def test_parse_cgroup(text: str, expected: CgroupInfo) -> None:
    if expected.container_id:  # the unit the path names is the runtime's, not the process's
        expected = dataclasses.replace(expected, systemd_unit="")
    assert parse_cgroup(text) == expected


def test_a_container_has_no_systemd_unit_a_service_has_one() -> None:
    assert parse_cgroup(f"0::{POD_SLICE}/cri-containerd-{CID}.scope\n").systemd_unit == ""
    assert parse_cgroup(f"0::/system.slice/docker-{CID}.scope\n").systemd_unit == ""
    assert parse_cgroup("0::/system.slice/nginx.service\n").systemd_unit == "nginx.service"
    session = parse_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n")
    assert session.systemd_unit == "session-2.scope"


def test_innermost_container_wins() -> None:
    inner = "ab" * 32
    info = parse_cgroup(f"0::/system.slice/docker-{CID}.scope/docker/{inner}\n")
    assert (info.container_id, info.runtime) == (inner, "docker")


def test_v2_is_preferred_over_v1_when_both_name_a_container() -> None:
    other = "cd" * 32
    info = parse_cgroup(f"8:pids:/docker/{other}\n0::/system.slice/docker-{CID}.scope\n")
    assert info.container_id == CID
