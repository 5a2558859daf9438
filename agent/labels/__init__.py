"""The label stage: who ran a process (cgroup, container, pod, systemd unit), as labels.

`Labeler` is the facade the pipeline uses; the rest is exported for configuration
(relabel configs, the Kubernetes watcher) and for tests.
"""

from agent.labels.cgroup import CgroupInfo, parse_cgroup
from agent.labels.guard import OVERFLOW_LABEL, CardinalityGuard, overflow_series
from agent.labels.kubeconfig import (
    ApiConnection,
    KubernetesConfigError,
    discover_connection,
    load_in_cluster,
    load_kubeconfig,
)
from agent.labels.kubernetes import (
    ContainerMetadata,
    KubernetesPodWatcher,
    PodMetadata,
    PodMetadataSource,
)
from agent.labels.labeler import Labeler
from agent.labels.relabel import (
    DEFAULT_RELABEL_CONFIGS,
    DEFAULT_RELABEL_CONFIGS_YAML,
    RelabelConfig,
    RelabelConfigError,
    parse_relabel_configs,
    relabel,
)

__all__ = [
    "DEFAULT_RELABEL_CONFIGS",
    "DEFAULT_RELABEL_CONFIGS_YAML",
    "OVERFLOW_LABEL",
    "ApiConnection",
    "CardinalityGuard",
    "CgroupInfo",
    "ContainerMetadata",
    "KubernetesConfigError",
    "KubernetesPodWatcher",
    "Labeler",
    "PodMetadata",
    "PodMetadataSource",
    "RelabelConfig",
    "RelabelConfigError",
    "discover_connection",
    "load_in_cluster",
    "load_kubeconfig",
    "overflow_series",
    "parse_cgroup",
    "parse_relabel_configs",
    "relabel",
]
