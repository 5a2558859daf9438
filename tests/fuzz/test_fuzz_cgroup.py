"""parse_cgroup on arbitrary text, and on generated container cgroups of every runtime and
driver: the container id, runtime and pod uid come back, whatever surrounds them."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from agent.labels.cgroup import CgroupInfo, parse_cgroup
from tests.fuzz import TRICKY_CHARS, any_text, fuzz_settings

HEX = "0123456789abcdef"
CONTAINER_ID = st.text(HEX, min_size=64, max_size=64)
POD_UID = st.builds(
    "-".join,
    st.tuples(*(st.text(HEX, min_size=n, max_size=n) for n in (8, 4, 4, 4, 12))),
)
QOS = st.sampled_from(["", "burstable", "besteffort"])
# cgroup directory names that are not containers, pods or units: any byte but "/" and "\n"
# (the kernel refuses "\n" in cgroup names), plus a few usual ones.
PLAIN_SEGMENT = st.one_of(
    st.sampled_from(["user.slice", "user-1000.slice", "init.scope", "system.slice", "a b"]),
    st.text(
        st.one_of(
            st.characters(codec="utf-8", exclude_characters="/\n:"),
            st.sampled_from("\r\x0b\x85\u2028 "),
        ),
        min_size=1,
        max_size=12,
    ).filter(lambda s: not s.endswith((".service", ".scope", ".slice")) and s not in (".", "..")),
)


@dataclass(frozen=True)
class Case:
    text: str
    container_id: str
    runtime: str
    pod_uid: str


def pod_slice(uid: str, qos: str, prefix: str) -> str:
    """kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice (systemd driver)."""
    kube = f"{prefix}kubepods"
    qos_part = f"-{qos}" if qos else ""
    outer = f"/{kube}.slice" + (f"/{kube}{qos_part}.slice" if qos else "")
    return f"{outer}/{kube}{qos_part}-pod{uid.replace('-', '_')}.slice"


@st.composite
def container_cases(draw: st.DrawFn) -> Case:
    cid, uid, qos = draw(CONTAINER_ID), draw(POD_UID), draw(QOS)
    prefix = draw(st.sampled_from(["", "kubelet-"]))  # kind nests kubelet.slice
    head = "".join("/" + s for s in draw(st.lists(PLAIN_SEGMENT, max_size=2)))
    form = draw(
        st.sampled_from(["docker-scope", "docker-fs", "cri", "crio", "libpod", "fs-pod", "colon"])
    )
    if form == "docker-scope":
        case = Case(f"{head}/system.slice/docker-{cid}.scope", cid, "docker", "")
    elif form == "docker-fs":
        case = Case(f"{head}/docker/{cid}", cid, "docker", "")
    elif form in ("cri", "crio"):
        scope = "cri-containerd" if form == "cri" else "crio"
        path = f"{pod_slice(uid, qos, prefix)}/{scope}-{cid}.scope"
        case = Case(path, cid, "containerd" if form == "cri" else "cri-o", uid)
    elif form == "libpod":
        case = Case(f"{head}/machine.slice/libpod-{cid}.scope/container", cid, "podman", "")
    elif form == "fs-pod":
        path = f"/kubepods/{qos + '/' if qos else ''}pod{uid}/{cid}"
        case = Case(path, cid, "", uid)
    else:
        qos_part = f"-{qos}" if qos else ""
        slice_name = f"kubepods{qos_part}-pod{uid.replace('-', '_')}.slice"
        path = f"/system.slice/containerd.service/{slice_name}:cri-containerd:{cid}"
        case = Case(path, cid, "containerd", uid)
    return case


@st.composite
def cgroup_files(draw: st.DrawFn) -> tuple[str, Case]:
    """A whole /proc/PID/cgroup: the container on v2 or on v1 controllers, among others."""
    case = draw(container_cases())
    layout = draw(st.sampled_from(["v2", "v1", "hybrid"]))
    lines = []
    if layout == "v2":
        lines.append(f"0::{case.text}")
    else:
        for number, controllers in enumerate(["cpu,cpuacct", "memory", "pids"], start=2):
            lines.append(f"{number}:{controllers}:{case.text}")
        lines.append(f"1:name=systemd:{case.text}")
        if layout == "hybrid":
            lines.append("0::/")
    order = draw(st.permutations(lines))
    return "".join(line + "\n" for line in order), case


@fuzz_settings(500)
@given(st.one_of(any_text, st.lists(any_text, max_size=6).map("\n".join)))
def test_parse_cgroup_never_raises(text: str) -> None:
    assert isinstance(parse_cgroup(text), CgroupInfo)


@fuzz_settings(300)
@given(cgroup_files())
def test_container_cgroups_give_id_runtime_and_pod(pair: tuple[str, Case]) -> None:
    text, case = pair
    info = parse_cgroup(text)
    assert (info.container_id, info.runtime, info.pod_uid) == (
        case.container_id,
        case.runtime,
        case.pod_uid,
    )
    assert info.path == case.text


@fuzz_settings(200)
@given(cgroup_files(), st.lists(st.text(TRICKY_CHARS + "0123456789", max_size=20), max_size=4))
def test_garbage_lines_do_not_hide_the_container(pair: tuple[str, Case], junk: list[str]) -> None:
    """Lines that are not memberships (no path after two colons) change nothing."""
    text, case = pair
    noise = [line for line in junk if line.count(":") < 2 and "\n" not in line]
    info = parse_cgroup("\n".join(noise) + "\n" + text)
    assert info.container_id == case.container_id
    assert info.pod_uid == case.pod_uid


@fuzz_settings(200)
@given(st.lists(PLAIN_SEGMENT, min_size=1, max_size=5))
def test_plain_paths_come_back_without_a_container(segments: list[str]) -> None:
    """A v2 path of ordinary directories (any bytes but "/" and "\\n") round-trips."""
    path = "/" + "/".join(segments)
    info = parse_cgroup(f"0::{path}\n")
    assert info.path == path
    assert (info.container_id, info.runtime, info.pod_uid) == ("", "", "")
