"""helm/strobe: rendered and linted with the Helm v4 SDK (helm-python-sdk), validated with
kubernetes-validate --strict, and its config file and STROBE_* variables read back with the
agent's own configuration loader."""

from __future__ import annotations

import argparse
import base64
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python as helm
import pytest
import yaml

from agent.admin.server import UNAUTHENTICATED_PATHS
from agent.config import OPTION_BY_NAME, Config, build_config
from tests.conftest import REPO

CHART = REPO / "helm" / "strobe"
NAMESPACE = "profiling"
RELEASE = "strobe"
AGENT_CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "CHECKPOINT_RESTORE", "DAC_READ_SEARCH", "SYSLOG"}
CRD_GROUP = "monitoring.coreos.com/v1"

REMOTE_TLS: dict[str, Any] = {
    "remoteStore": {
        "address": "parca.example.com:7070",
        "protocol": "otlp",
        "headers": {"x-scope-orgid": "tenant-a"},
        "bearerToken": {"existingSecret": "parca-token", "key": "bearer"},
        "tls": {
            "existingSecret": "parca-mtls",
            "caKey": "ca.crt",
            "certKey": "tls.crt",
            "keyKey": "tls.key",
        },
    },
    "localStore": {"enabled": False},
    "config": {
        "window": "30s",
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}
        ],
    },
}
MONITORS: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "podMonitor": {"enabled": True},
}
PRIVILEGED: dict[str, Any] = {"securityContext": {"privileged": True}}
SYS_ADMIN: dict[str, Any] = {
    "securityContext": {"sysAdmin": True, "seccompProfile": {"type": "RuntimeDefault"}}
}
LOOPBACK: dict[str, Any] = {"http": {"expose": False}, "kernelHeaders": {"mountHost": False}}
GIVEN_TOKEN: dict[str, Any] = {"http": {"token": {"existingSecret": "ops-token", "key": "t"}}}

VALUE_SETS = {
    "defaults": {},
    "remote-store-tls": REMOTE_TLS,
    "monitors": MONITORS,
    "privileged": PRIVILEGED,
    "sys-admin": SYS_ADMIN,
    "loopback": LOOPBACK,
    "given-token": GIVEN_TOKEN,
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_text(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text (comments and NOTES.txt included)."""
    return dict(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = render_text(chart, values)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {doc["kind"] for doc in docs}


def agent_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["strobe"]
    return dict(containers[0])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def mounts_of(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volumeMount, volume)."""
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in agent_container(docs)["volumeMounts"]}


def agent_config(docs: list[dict[str, Any]], tmp_path: Path) -> Config:
    """What the agent makes of the chart's config file and environment (run command)."""
    config_file = tmp_path / "strobe.yaml"
    config_file.write_text(one(docs, "ConfigMap")["data"]["strobe.yaml"])
    env = {k: v for k, v in env_of(agent_container(docs)).items() if isinstance(v, str)}
    return build_config(argparse.Namespace(config=config_file), "run", environ=env)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints_clean(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_manifests_validate_strictly(chart: helm.Chart, name: str, tmp_path: Path) -> None:
    docs = render(chart, VALUE_SETS[name])
    core = [doc for doc in docs if doc["apiVersion"] != CRD_GROUP]
    files = []
    for index, doc in enumerate(core):
        path = tmp_path / f"{index}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    validator = REPO / ".venv" / "bin" / "kubernetes-validate"
    result = subprocess.run(
        [str(validator), "--strict", *files], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("INFO") == len(files), result.stdout  # one pass per file


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_the_agent_accepts_the_rendered_config_and_env(
    chart: helm.Chart, name: str, tmp_path: Path
) -> None:
    docs = render(chart, VALUE_SETS[name])
    container = agent_container(docs)
    assert container["args"] == ["run", "--config", "/etc/strobe/strobe.yaml"]
    assert "/etc/strobe/strobe.yaml" in mounts_of(docs)
    for variable in env_of(container):
        if variable.startswith("STROBE_"):
            assert variable.removeprefix("STROBE_").lower() in OPTION_BY_NAME, variable
    config = agent_config(docs, tmp_path)
    assert config.sources["local_store"] == "environment"
    assert config.cache_dir == "/var/cache/strobe"
    assert mounts_of(docs)["/var/cache/strobe"][0].get("readOnly") is not True


def test_defaults(chart: helm.Chart, tmp_path: Path) -> None:
    docs = render(chart, {})
    assert kinds(docs) == {
        "DaemonSet",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
    }
    daemonset = one(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    container = agent_container(docs)
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "384Mi"},
    }
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == AGENT_CAPS
    assert security["seccompProfile"] == {"type": "Unconfined"}
    env = env_of(container)
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    mounts = mounts_of(docs)
    for host_dir in ("/lib/modules", "/usr/src", "/sys/fs/cgroup"):
        mount, volume = mounts[host_dir]
        assert mount["readOnly"] is True and volume["hostPath"]["path"] == host_dir
    assert "/sys/kernel/debug" not in mounts and "/proc" not in mounts
    assert mounts["/var/lib/strobe"][1]["hostPath"]["path"] == "/var/lib/strobe"
    config = agent_config(docs, tmp_path)
    assert config.local_store == "/var/lib/strobe/profiles"
    assert config.frequency == 19 and config.window == 10.0


def test_the_http_token_protects_a_non_loopback_bind(chart: helm.Chart, tmp_path: Path) -> None:
    docs = render(chart, {})
    config = agent_config(docs, tmp_path)
    assert config.http_address == "0.0.0.0:7071"
    token_file = PurePosixPath(config.http_token_file)
    mount, volume = mounts_of(docs)[str(token_file.parent)]
    secret = one(docs, "Secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    token = base64.b64decode(secret["data"][token_file.name]).decode()
    assert len(token) >= 32 and token.isalnum()
    # A fresh random token per install: two renders differ.
    again = one(render(chart, {}), "Secret")["data"][token_file.name]
    assert again != secret["data"][token_file.name]
    probes = agent_container(docs)
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Started means profiling: /readyz (sampler attached), not /healthz (HTTP server up).
    assert probes["startupProbe"]["httpGet"]["path"] == "/readyz"
    # The kubelet sends no token: every probe must ask a route the agent leaves open.
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = probes[probe]["httpGet"]
        assert get["path"] in UNAUTHENTICATED_PATHS and "httpHeaders" not in get, probe


def test_comments_say_which_routes_need_the_token(chart: helm.Chart) -> None:
    """/healthz and /readyz are open (agent/admin/server.py); the chart's words must agree."""
    assert sorted(UNAUTHENTICATED_PATHS) == ["/healthz", "/readyz"]
    texts = render_text(chart, {})
    daemonset = texts["strobe/templates/daemonset.yaml"]
    assert re.search(r"# /healthz and /readyz answer without the token", daemonset)
    assert not re.search(r"/readyz[^\n]*\) does", daemonset)  # the old "/readyz ... does"
    values = (CHART / "values.yaml").read_text()
    assert "on every route but /healthz and /readyz" in values
    notes = texts["strobe/templates/NOTES.txt"]
    assert "/healthz and /readyz (the probes) do not" in notes
    needs_token = notes.split("need the bearer token")[0]
    assert "/readyz" not in needs_token and "/metrics" in needs_token


def test_notes_say_the_image_must_be_built_and_pushed(chart: helm.Chart) -> None:
    notes = render_text(chart, {})["strobe/templates/NOTES.txt"]
    assert "not on any public registry" in notes and "scripts/build-image.sh" in notes
    assert "--set image.repository=" in notes and "--set image.tag=" in notes
    given = {"image": {"repository": "registry.example.com/strobe", "tag": "0.1.0"}}
    assert "build-image" not in render_text(chart, given)["strobe/templates/NOTES.txt"]
    image = agent_container(render(chart, given))["image"]
    assert image == "registry.example.com/strobe:0.1.0"


def test_given_token_secret_is_used_and_none_is_made(chart: helm.Chart, tmp_path: Path) -> None:
    docs = render(chart, GIVEN_TOKEN)
    assert "Secret" not in kinds(docs)
    config = agent_config(docs, tmp_path)
    assert config.http_token_file == "/etc/strobe/http-token/t"
    volume = mounts_of(docs)["/etc/strobe/http-token"][1]
    assert volume["secret"]["secretName"] == "ops-token"


def test_loopback_needs_no_token_and_uses_the_image_headers(
    chart: helm.Chart, tmp_path: Path
) -> None:
    docs = render(chart, LOOPBACK)
    assert not {"Secret", "Service"} & kinds(docs)
    config = agent_config(docs, tmp_path)
    assert config.http_address == "127.0.0.1:7071"
    assert not config.values.get("http_token_file")
    mounts = mounts_of(docs)
    assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    assert "readinessProbe" not in agent_container(docs)


def test_remote_store_with_tls_and_bearer_token(chart: helm.Chart, tmp_path: Path) -> None:
    docs = render(chart, REMOTE_TLS)
    config = agent_config(docs, tmp_path)
    assert config.remote_store_address == "parca.example.com:7070"
    assert config.remote_store_protocol == "otlp"
    assert config.remote_store_headers == (("x-scope-orgid", "tenant-a"),)
    assert config.no_local_store is True
    assert config.window == 30.0
    assert config.relabel_configs[0].target_label == "namespace"
    assert config.remote_store_spool_dir.startswith("/var/lib/strobe/")
    mounts = mounts_of(docs)
    expected = {
        "remote_store_bearer_token_file": ("parca-token", "bearer"),
        "remote_store_ca_file": ("parca-mtls", "ca.crt"),
        "remote_store_cert_file": ("parca-mtls", "tls.crt"),
        "remote_store_key_file": ("parca-mtls", "tls.key"),
    }
    for option, (secret, key) in expected.items():
        path = PurePosixPath(config.values[option])
        mount, volume = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        assert (volume["secret"]["secretName"], path.name) == (secret, key), option


def test_service_and_pod_monitors_scrape_with_the_token(chart: helm.Chart) -> None:
    docs = render(chart, MONITORS)
    pod_labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    token_secret = one(docs, "Secret")["metadata"]["name"]
    container = agent_container(docs)
    port_name = container["ports"][0]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["targetPort"] == port_name
    assert service["spec"]["selector"].items() <= pod_labels.items()

    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == CRD_GROUP
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": token_secret, "key": "token"},
    }
    assert set(endpoint) <= {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "authorization",
        "relabelings",
        "metricRelabelings",
    }

    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["apiVersion"] == CRD_GROUP
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] == port_name
    assert pod_endpoint["authorization"] == endpoint["authorization"]


def test_privileged_is_an_opt_in(chart: helm.Chart) -> None:
    security = agent_container(render(chart, PRIVILEGED))["securityContext"]
    assert security["privileged"] is True
    assert "capabilities" not in security and "allowPrivilegeEscalation" not in security


def test_sys_admin_is_an_opt_in_for_runtime_default_seccomp(chart: helm.Chart) -> None:
    security = agent_container(render(chart, SYS_ADMIN))["securityContext"]
    assert set(security["capabilities"]["add"]) == AGENT_CAPS | {"SYS_ADMIN"}
    assert security["allowPrivilegeEscalation"] is True  # the API refuses false with SYS_ADMIN
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_rbac_reads_pods_and_nodes_only(chart: helm.Chart) -> None:
    docs = render(chart, {})
    rules = one(docs, "ClusterRole")["rules"]
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("pods", "get"), ("pods", "list"), ("pods", "watch"), ("nodes", "get")}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "strobe", "namespace": NAMESPACE}
    ]


def test_config_changes_roll_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        template = one(render(chart, values), "DaemonSet")["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"frequency": 49}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"node_name": "x"}}, "config.node_name is set by the chart"),
        ({"config": {"http_address": "0.0.0.0:1"}}, "config.http_address is set by the chart"),
        ({"localStore": {"enabled": False}}, "needs remoteStore.address"),
        ({"http": {"expose": False}, "serviceMonitor": {"enabled": True}}, "127.0.0.1"),
        ({"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}, "service"),
        (
            {"remoteStore": {"address": "a:1", "tls": {"existingSecret": "s", "certKey": "c"}}},
            "both certKey and keyKey",
        ),
    ],
)
def test_inconsistent_values_fail_to_render(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@pytest.mark.parametrize(
    "values",
    [
        {"serviceMonitr": {"enabled": True}},
        {"securityContext": {"privileged": "yes"}},
        {"remoteStore": {"protocol": "grpc"}},
        {"env": {"LOG_LEVEL": "debug"}},
    ],
)
def test_schema_rejects_mistyped_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
