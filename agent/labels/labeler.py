"""The label stage: a process -> its discovery labels -> its series labels.

Discovery labels (Prometheus `__meta_*` style; a label without a value is absent):

    __meta_process_pid, __meta_process_comm, __meta_process_executable, __meta_process_cgroup
    __meta_container_id, __meta_container_runtime          (docker|containerd|cri-o|podman)
    __meta_systemd_unit                                    (innermost .service/.scope)
    __meta_kubernetes_namespace, __meta_kubernetes_pod_name, __meta_kubernetes_pod_uid,
    __meta_kubernetes_container_name, __meta_kubernetes_node_name,
    __meta_kubernetes_pod_label_<name>                     (name sanitized to [a-zA-Z0-9_])
    node                                                   (this agent's node name)

Series labels are what `relabel_configs` make of them, minus every "__*" label and pid.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import metrics
from agent.labels.cgroup import CgroupInfo, parse_cgroup
from agent.labels.kubernetes import PodMetadata, PodMetadataSource
from agent.labels.relabel import DEFAULT_RELABEL_CONFIGS, RelabelConfig, relabel, series_labels
from agent.model import ProcessInfo
from agent.util.lru import idle_keys

Labels = tuple[tuple[str, str], ...]
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(name: str) -> str:
    """Prometheus' strutil.SanitizeLabelName: every char outside [a-zA-Z0-9_] becomes "_"."""
    return _INVALID_LABEL_CHARS.sub("_", name)


def process_labels(process: ProcessInfo, cgroup: CgroupInfo, node_name: str) -> dict[str, str]:
    """The discovery labels that /proc alone gives (no API server involved)."""
    labels = {
        "__meta_process_pid": str(process.pid),
        "__meta_process_comm": process.comm,
        "__meta_process_executable": process.exe,
        "__meta_process_cgroup": cgroup.path,
        "__meta_container_id": cgroup.container_id,
        "__meta_container_runtime": cgroup.runtime,
        "__meta_systemd_unit": cgroup.systemd_unit,
        "__meta_kubernetes_pod_uid": cgroup.pod_uid,
        "node": node_name,
    }
    return {name: value for name, value in labels.items() if value}


def kubernetes_labels(pod: PodMetadata, container_id: str) -> dict[str, str]:
    """The discovery labels a pod (and the process's container in it) contributes."""
    labels = {
        "__meta_kubernetes_namespace": pod.namespace,
        "__meta_kubernetes_pod_name": pod.name,
        "__meta_kubernetes_pod_uid": pod.uid,
        "__meta_kubernetes_node_name": pod.node_name,
    }
    container = pod.container(container_id) if container_id else None
    if container is not None:
        labels["__meta_kubernetes_container_name"] = container.name
        labels["__meta_container_runtime"] = container.runtime
    for name, value in pod.labels:
        labels[f"__meta_kubernetes_pod_label_{sanitize_label_name(name)}"] = value
    return {name: value for name, value in labels.items() if value}


def read_cgroup(proc: Path, pid: int, start_time: int) -> CgroupInfo:
    """The cgroup of `pid`, if it is still the process that started at `start_time`.

    A vanished, reused or unreadable pid gives an empty CgroupInfo: wrong labels are
    worse than none.
    """
    try:
        if start_time and _start_time(proc / str(pid) / "stat") != start_time:
            return CgroupInfo()
        return parse_cgroup(_read_raw_text(proc / str(pid) / "cgroup"))
    except (OSError, ValueError):
        return CgroupInfo()


def _start_time(stat_path: Path) -> int:
    text = stat_path.read_text()
    # comm (field 2) may contain spaces and ")": the fields resume after the last ")".
    fields_after_comm = text[text.rindex(")") + 2 :].split()
    return int(fields_after_comm[19])  # field 22 overall; field 3 is the first here


def _last_window(entry: _Entry) -> int:
    return entry.window


@dataclass
class _Entry:
    cgroup: CgroupInfo
    base: dict[str, str]
    series: Labels | None = None
    final: bool = False  # series is settled (no pod metadata still to wait for)
    window: int = 0  # the last window that used it


class Labeler:
    """Labels for processes. Not thread-safe: one per pipeline.

    `relabel_configs=None` applies DEFAULT_RELABEL_CONFIGS (node, namespace, pod,
    container, container_id, systemd_unit, comm); `[]` keeps only `node`.
    """

    def __init__(
        self,
        node_name: str,
        relabel_configs: Sequence[RelabelConfig] | None = None,
        kubernetes: PodMetadataSource | None = None,
        proc: Path = Path("/proc"),
        max_processes: int = 16384,
        idle_windows: int = 2,
    ) -> None:
        self.node_name = node_name
        self.relabel_configs = tuple(
            DEFAULT_RELABEL_CONFIGS if relabel_configs is None else relabel_configs
        )
        self.kubernetes = kubernetes
        self.proc = proc
        self.max_processes = max_processes
        # Entries unused this many windows are dropped: under churn the cache holds the
        # processes that ran lately; one that runs again costs one /proc read.
        self.idle_windows = idle_windows
        self._window = 0
        self._entries: OrderedDict[tuple[int, int, str, str], _Entry] = OrderedDict()

    def discovery_labels(self, process: ProcessInfo) -> dict[str, str]:
        """All `__meta_*` labels (plus `node`) of the process; absent ones are omitted."""
        entry = self._entry(process)
        labels = dict(entry.base)
        pod = self._pod(entry.cgroup)
        if pod is not None:
            labels.update(kubernetes_labels(pod, entry.cgroup.container_id))
        return labels

    def series_labels(self, process: ProcessInfo) -> Labels | None:
        """Sorted series labels after relabeling; None when relabeling dropped the process."""
        entry = self._entry(process)
        if entry.final:
            return entry.series
        pod = self._pod(entry.cgroup)
        labels = dict(entry.base)
        if pod is not None:
            labels.update(kubernetes_labels(pod, entry.cgroup.container_id))
        relabeled = relabel(labels, self.relabel_configs)
        entry.series = None if relabeled is None else series_labels(relabeled)
        entry.final = self._settled(entry.cgroup, pod)
        return entry.series

    def set_relabel_configs(self, relabel_configs: Sequence[RelabelConfig] | None) -> None:
        """New rules (SIGHUP): every process's series is worked out again."""
        self.relabel_configs = tuple(
            DEFAULT_RELABEL_CONFIGS if relabel_configs is None else relabel_configs
        )
        for entry in self._entries.values():
            entry.final = False

    def _entry(self, process: ProcessInfo) -> _Entry:
        # exe and comm too: an exec keeps pid and start time but changes both.
        key = (process.pid, process.start_time, process.exe, process.comm)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.window = self._window
            return entry
        cgroup = read_cgroup(self.proc, process.pid, process.start_time)
        entry = _Entry(cgroup, process_labels(process, cgroup, self.node_name), window=self._window)
        self._entries[key] = entry
        while len(self._entries) > self.max_processes:
            self._entries.popitem(last=False)
        metrics.LABEL_CACHE_SIZE.set(len(self._entries))
        return entry

    def end_window(self) -> None:
        """Drop the entries of processes no sample used in the last idle_windows windows."""
        self._window += 1
        for key in idle_keys(self._entries, _last_window, self._window - self.idle_windows):
            del self._entries[key]
        metrics.LABEL_CACHE_SIZE.set(len(self._entries))

    def _settled(self, cgroup: CgroupInfo, pod: PodMetadata | None) -> bool:
        """Whether the series labels can be cached for good.

        Until the pod (and the container's status in it) shows up in the API, keep
        asking: the watch may just be behind a pod that started a moment ago.
        """
        if self.kubernetes is None or not cgroup.pod_uid:
            return True
        if pod is None:
            return False
        return not cgroup.container_id or pod.container(cgroup.container_id) is not None

    def _pod(self, cgroup: CgroupInfo) -> PodMetadata | None:
        if self.kubernetes is None or not (cgroup.pod_uid or cgroup.container_id):
            return None
        return self.kubernetes.pod(cgroup.pod_uid, cgroup.container_id)


def _read_raw_text(path: Path) -> str:
    """File text with line ends as the kernel wrote them (a "\\r" in a cgroup name stays)."""
    with path.open(newline="") as file:
        return file.read()
