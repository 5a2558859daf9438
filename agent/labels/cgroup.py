"""Who runs a process, as far as its cgroup tells: container, pod, systemd unit.

`parse_cgroup` reads the text of /proc/PID/cgroup (v1, v2 or hybrid) and knows the
path forms of docker, containerd (CRI), CRI-O and podman under both cgroup drivers:

    0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
    0::/system.slice/docker-<id>.scope          0::/machine.slice/libpod-<id>.scope/container
    0::/kubepods.slice/.../crio-<id>.scope      4:memory:/kubepods/burstable/pod<uid>/<id>
    3:pids:/docker/<id>
    0::/system.slice/containerd.service/kubepods-burstable-pod<uid>.slice:cri-containerd:<id>

It is pure (text in, value out) so every form is testable without the host having it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The runtime names a container id can come with (also what Kubernetes' containerID
# schemes map to); "" when the path shows a container but not which runtime made it.
DOCKER = "docker"
CONTAINERD = "containerd"
CRIO = "cri-o"
PODMAN = "podman"

_ID = r"[0-9a-f]{64}"
# systemd-driver scope units; "conmon" scopes are the monitor next to a container, not it.
_SCOPE_PREFIXES = {
    "docker-": DOCKER,
    "cri-containerd-": CONTAINERD,
    "crio-": CRIO,
    "libpod-": PODMAN,
    "nerdctl-": CONTAINERD,
}
# ".scope" with the systemd cgroup driver; podman's cgroupfs driver has a bare
# "libpod_parent/libpod-<id>" (seen with runc on a hybrid host).
_SCOPE = re.compile(rf"^(?P<prefix>[a-z-]+-)(?P<id>{_ID})(?:\.scope)?$")
# containerd with the systemd driver but its own cgroup layout: "<slice>:<prefix>:<id>"
_COLON_FORM = re.compile(rf"^[^:]*:(?P<prefix>cri-containerd|crio|docker):(?P<id>{_ID})$")
_COLON_RUNTIMES = {"cri-containerd": CONTAINERD, "crio": CRIO, "docker": DOCKER}
_BARE_ID = re.compile(rf"^{_ID}$")
# Pod cgroups: "pod<uid>" (cgroupfs) or "[kubelet-]kubepods[-<qos>]-pod<uid_underscored>.slice".
_POD_CGROUPFS = re.compile(r"^pod(?P<uid>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})$")
_POD_SLICE = re.compile(
    r"^(?:[a-z0-9]+-)*kubepods(?:-[a-z]+)*-pod"
    r"(?P<uid>[0-9a-f]{8}(?:_[0-9a-f]{4}){3}_[0-9a-f]{12})\.slice$"
)
_UNIT = re.compile(r"^[^/]+\.(?:service|scope)$")


@dataclass(frozen=True)
class CgroupInfo:
    """What a process's cgroup membership says; "" for what it does not say."""

    path: str = ""  # the most telling cgroup path (see parse_cgroup)
    container_id: str = ""  # full 64-hex id
    runtime: str = ""  # docker | containerd | cri-o | podman | "" (unknown)
    pod_uid: str = ""  # Kubernetes pod UID, dashed form
    systemd_unit: str = ""  # innermost .service or .scope unit on the path; "" in a container


@dataclass(frozen=True)
class _Membership:
    hierarchy: str  # "0" for cgroup v2
    controllers: str  # "" for v2, "cpu,cpuacct", "name=systemd", ...
    path: str


def parse_cgroup(text: str) -> CgroupInfo:
    """Parse /proc/PID/cgroup. Never raises: malformed lines are ignored.

    The path reported is the first, in order v2, name=systemd, other v1 controllers,
    that names a container; else the first of them that is not the root "/".
    """
    memberships = _ordered(_memberships(text))
    if not memberships:
        return CgroupInfo()
    for membership in memberships:
        container_id, runtime = container_of(membership.path)
        if container_id:
            return _info(membership.path, container_id, runtime, memberships)
    chosen = next((m.path for m in memberships if m.path not in ("", "/")), memberships[0].path)
    return _info(chosen, "", "", memberships)


def container_of(path: str) -> tuple[str, str]:
    """(container id, runtime) of the innermost container on a cgroup path, or ("", "")."""
    found = ("", "")
    parent = ""
    for segment in path.split("/"):
        match = _container_segment(segment, parent)
        if match[0]:
            found = match
        parent = segment
    return found


def pod_uid_of(path: str) -> str:
    """The Kubernetes pod UID on a cgroup path (dashed), or ""."""
    for segment in re.split("[/:]", path):  # ":" for "<pod slice>:cri-containerd:<id>"
        if match := _POD_CGROUPFS.match(segment):
            return match["uid"]
        if match := _POD_SLICE.match(segment):
            return match["uid"].replace("_", "-")
    return ""


def systemd_unit_of(path: str) -> str:
    """The innermost .service or .scope unit on a cgroup path, or ""."""
    units = [segment for segment in path.split("/") if _UNIT.match(segment)]
    return units[-1] if units else ""


def _container_segment(segment: str, parent: str) -> tuple[str, str]:
    if match := _SCOPE.match(segment):
        runtime = _SCOPE_PREFIXES.get(match["prefix"])
        return (match["id"], runtime) if runtime is not None else ("", "")
    if match := _COLON_FORM.match(segment):
        return match["id"], _COLON_RUNTIMES[match["prefix"]]
    if _BARE_ID.match(segment):
        # cgroupfs driver: /docker/<id>, /kubepods/<qos>/pod<uid>/<id> (runtime unknown here)
        return segment, DOCKER if parent == "docker" else ""
    return "", ""


def _memberships(text: str) -> list[_Membership]:
    memberships = []
    # Only "\n" ends a line (cgroup names may hold "\r", "\x85", spaces, anything else).
    for line in text.split("\n"):
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        memberships.append(_Membership(parts[0], parts[1], parts[2]))
    return memberships


def _ordered(memberships: list[_Membership]) -> list[_Membership]:
    def rank(membership: _Membership) -> int:
        if membership.hierarchy == "0" and membership.controllers == "":
            return 0
        return 1 if membership.controllers == "name=systemd" else 2

    return sorted(memberships, key=rank)  # stable: v1 controllers keep their file order


def _info(path: str, container_id: str, runtime: str, memberships: list[_Membership]) -> CgroupInfo:
    # The unit and pod may sit on another hierarchy than the container (hybrid hosts).
    # A container's unit is its runtime's scope (cri-containerd-<id>.scope), or the
    # runtime's own service: a second per-container label, or a wrong one. Containers
    # are named by container_id and pod; the unit is for services and sessions.
    unit = (
        ""
        if container_id
        else systemd_unit_of(path)
        or next((u for m in memberships if (u := systemd_unit_of(m.path))), "")
    )
    pod_uid = pod_uid_of(path) or next((u for m in memberships if (u := pod_uid_of(m.path))), "")
    return CgroupInfo(path, container_id, runtime, pod_uid, unit)
