"""The pod watcher against a real HTTP(S) server replaying recorded API responses."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from agent.labels.kubeconfig import (
    ApiConnection,
    KubernetesConfigError,
    discover_connection,
    load_in_cluster,
    load_kubeconfig,
)
from agent.labels.kubernetes import KubernetesPodWatcher, pod_from_json
from agent.metrics import REGISTRY
from tests.labels.k8s_fake import (
    K8S_DATA,
    TLS,
    TOKEN,
    FakeApiServer,
    WatchStep,
    server_tls,
    watch_lines,
)

NODE = "worker-1"


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def api_up() -> float | None:
    return REGISTRY.get_sample_value("strobe_kubernetes_api_up")


def recorded_pods(name: str) -> dict[str, dict]:
    """name -> pod object of a recorded PodList."""
    return {p["metadata"]["name"]: p for p in json.loads((K8S_DATA / name).read_text())["items"]}


def container_id(pod: dict, name: str) -> str:
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == name)
    return status["containerID"].split("://", 1)[1]


def write_kubeconfig(
    path: Path, server: str, user: dict, cluster_extra: dict | None = None
) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [
            {"name": "test-cluster", "cluster": {"server": server, **(cluster_extra or {})}}
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test-cluster", "user": "agent"}}],
        "users": [{"name": "agent", "user": user}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def watchers() -> Iterator[list[KubernetesPodWatcher]]:
    started: list[KubernetesPodWatcher] = []
    yield started
    for watcher in started:
        watcher.close()


def start_watcher(
    watchers: list[KubernetesPodWatcher], connection: ApiConnection, **options: float
) -> KubernetesPodWatcher:
    settings = {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2, **options}
    watcher = KubernetesPodWatcher(connection, NODE, **settings)  # type: ignore[arg-type]
    watchers.append(watcher)
    return watcher.start()


def test_list_watch_delete_cut_stream_reconnect_and_gone_relist(
    api_server: FakeApiServer, tmp_path: Path, watchers: list[KubernetesPodWatcher]
) -> None:
    listed = recorded_pods("podlist.json")
    relisted = recorded_pods("podlist-relist.json")
    coredns, checkout = listed["coredns-5d78c9869d-8kqzl"], listed["checkout-7c9f8d6b5-x2x9k"]
    events = watch_lines("watch-events.jsonl")
    # Watch 1: five whole events (ADDED, MODIFIED x2, DELETED, BOOKMARK), then the
    # connection is cut in the middle of the sixth.
    api_server.watch_steps.put(WatchStep(events[:5], then="break", partial=events[5][:200]))
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, {"token": TOKEN})
    watcher = start_watcher(watchers, load_kubeconfig(kubeconfig))

    wait_for(lambda: len(api_server.watches()) >= 2)  # reconnected after the cut
    first_list, first_watch, second_watch = api_server.lists()[0], *api_server.watches()[:2]
    assert first_list.query == {"fieldSelector": f"spec.nodeName={NODE}"}
    assert first_list.authorization == f"Bearer {TOKEN}"
    assert first_watch.query["resourceVersion"] == "5001"  # the PodList's resourceVersion
    assert first_watch.query["allowWatchBookmarks"] == "true"
    assert second_watch.query["resourceVersion"] == "5020"  # the bookmark, not the cut event
    assert len(api_server.lists()) == 1  # a cut stream resumes; it does not relist
    assert api_up() == 1.0

    # DELETED: gone by uid and by container id.
    assert watcher.pod(coredns["metadata"]["uid"], "") is None
    assert watcher.pod("", container_id(coredns, "coredns")) is None
    # ADDED then MODIFIED with the container started: found by container id.
    cart = watcher.pod("", container_id(relisted["cart-6b8d9f7c4-m4n5p"], "cart"))
    assert cart is not None and (cart.namespace, cart.name) == ("shop", "cart-6b8d9f7c4-m4n5p")
    # MODIFIED labels; an init container's id also resolves to its pod.
    canary = watcher.pod("", container_id(checkout, "envoy"))
    assert canary is not None and ("rollout", "canary") in canary.labels
    init_id = checkout["status"]["initContainerStatuses"][0]["containerID"].split("://")[1]
    migrate = watcher.pod("", init_id)
    assert migrate is not None and migrate.container(init_id).name == "migrate"  # type: ignore[union-attr]
    # The half-received sixth event was not applied.
    exporter = watcher.pod(listed["node-exporter-q8w7e"]["metadata"]["uid"], "")
    assert exporter is not None and "broken-stream" not in dict(exporter.labels)

    # Watch 2: 410 Gone as an ERROR event -> relist (now a later PodList) -> watch from it.
    api_server.pod_list = (K8S_DATA / "podlist-relist.json").read_bytes()
    api_server.watch_steps.put(WatchStep(watch_lines("watch-gone.jsonl")))
    wait_for(lambda: len(api_server.watches()) >= 3)
    assert len(api_server.lists()) == 2
    assert api_server.watches()[2].query["resourceVersion"] == "6000"
    assert watcher.pod(checkout["metadata"]["uid"], "") is None  # not in the relist
    new_checkout = relisted["checkout-84c6d5f9b7-t7v2r"]
    found = watcher.pod("", container_id(new_checkout, "checkout"))
    assert found is not None and found.name == "checkout-84c6d5f9b7-t7v2r"
    assert len(watcher.cache) == len(relisted)

    # The third watch is waiting on the server: close() must still stop promptly.
    watcher.close()
    assert not watcher.running
    assert api_up() == 0.0


def test_http_410_on_watch_relists_and_resync_relists(
    api_server: FakeApiServer, watchers: list[KubernetesPodWatcher]
) -> None:
    api_server.watch_steps.put(WatchStep(then="status", status=410))
    connection = ApiConnection(api_server.url, token=TOKEN)
    start_watcher(watchers, connection, resync_seconds=1.0)
    wait_for(lambda: len(api_server.lists()) >= 2)  # relisted after the 410 status
    # Then the watch stays open until its timeoutSeconds, which the resync period bounds,
    # and the periodic resync lists again.
    api_server.watch_steps.put(WatchStep(then="hold"))
    wait_for(lambda: len(api_server.watches()) >= 2)
    assert int(api_server.watches()[1].query["timeoutSeconds"]) <= 1
    wait_for(lambda: len(api_server.lists()) >= 3)


def test_unreachable_api_is_logged_once_and_labels_fall_back(
    api_server: FakeApiServer,
    watchers: list[KubernetesPodWatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.labels.kubernetes")
    watcher = start_watcher(watchers, ApiConnection(api_server.url, token="wrong-token"))
    wait_for(lambda: len(api_server.requests) >= 4)  # retried several times
    assert watcher.running and not watcher.up
    assert api_up() == 0.0
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert "HTTP 401" in warnings[0].getMessage() and "cgroups only" in warnings[0].getMessage()
    assert watcher.pod("", "f" * 64) is None


def test_in_cluster_service_account_over_tls(
    tls_api_server: FakeApiServer, tmp_path: Path, watchers: list[KubernetesPodWatcher]
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "ca.crt").write_bytes((TLS / "ca.crt").read_bytes())
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(tls_api_server.port),
    }
    connection = discover_connection(None, environ, account)
    assert (
        connection is not None and connection.server == f"https://127.0.0.1:{tls_api_server.port}"
    )
    tls_api_server.watch_steps.put(WatchStep(then="hold"))
    watcher = start_watcher(watchers, connection)
    wait_for(lambda: len(watcher.cache) == 3)
    assert watcher.up
    # The token file is re-read per request (bound tokens rotate).
    (account / "token").write_text("rotated-token")
    assert connection.headers()["Authorization"] == "Bearer rotated-token"


def test_kubeconfig_client_certificate_and_ca_data(
    tmp_path: Path, watchers: list[KubernetesPodWatcher]
) -> None:
    server = FakeApiServer(tls=server_tls(require_client_cert=True)).start()
    try:
        user = {
            "token": TOKEN,
            "client-certificate-data": base64.b64encode((TLS / "client.crt").read_bytes()).decode(),
            "client-key-data": base64.b64encode((TLS / "client.key").read_bytes()).decode(),
        }
        ca_data = {
            "certificate-authority-data": base64.b64encode((TLS / "ca.crt").read_bytes()).decode()
        }
        kubeconfig = write_kubeconfig(tmp_path / "config", server.url, user, ca_data)
        server.watch_steps.put(WatchStep(then="hold"))
        watcher = start_watcher(watchers, load_kubeconfig(kubeconfig))
        wait_for(lambda: len(watcher.cache) == 3)
        watcher.close()
    finally:
        server.stop()


def test_wrong_ca_is_refused(
    tls_api_server: FakeApiServer,
    tmp_path: Path,
    watchers: list[KubernetesPodWatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_bytes((TLS / "other-ca.crt").read_bytes())
    cluster = {"certificate-authority": "certs/ca.crt"}  # relative to the kubeconfig
    kubeconfig = write_kubeconfig(
        tmp_path / "config", tls_api_server.url, {"token": TOKEN}, cluster
    )
    watcher = start_watcher(watchers, load_kubeconfig(kubeconfig))
    wait_for(lambda: any("unreachable" in r.getMessage() for r in caplog.records))
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert len(watcher.cache) == 0 and not tls_api_server.requests


def test_insecure_skip_tls_verify(
    tls_api_server: FakeApiServer, tmp_path: Path, watchers: list[KubernetesPodWatcher]
) -> None:
    cluster = {"insecure-skip-tls-verify": True}
    kubeconfig = write_kubeconfig(
        tmp_path / "config", tls_api_server.url, {"token": TOKEN}, cluster
    )
    tls_api_server.watch_steps.put(WatchStep(then="hold"))
    watcher = start_watcher(watchers, load_kubeconfig(kubeconfig))
    wait_for(lambda: len(watcher.cache) == 3)


def test_kubeconfig_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(KubernetesConfigError, match="cannot read"):
        load_kubeconfig(tmp_path / "missing")
    exec_user = {"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}}
    path = write_kubeconfig(tmp_path / "exec", "https://127.0.0.1:6443", exec_user)
    with pytest.raises(KubernetesConfigError, match="exec/auth-provider"):
        load_kubeconfig(path)
    with pytest.raises(KubernetesConfigError, match="no context named 'other'"):
        load_kubeconfig(path, "other")
    path = write_kubeconfig(tmp_path / "ftp", "ftp://example", {"token": "x"})
    with pytest.raises(KubernetesConfigError, match="not an http"):
        load_kubeconfig(path)
    with pytest.raises(KubernetesConfigError, match="KUBERNETES_SERVICE_HOST"):
        load_in_cluster({}, tmp_path)
    assert discover_connection(None, {}, tmp_path) is None


def test_pod_from_json_reads_the_recorded_format() -> None:
    pod = pod_from_json(recorded_pods("podlist.json")["checkout-7c9f8d6b5-x2x9k"])
    assert (pod.namespace, pod.node_name) == ("shop", NODE)
    assert [c.name for c in pod.containers] == ["migrate", "checkout", "envoy"]
    assert {c.runtime for c in pod.containers} == {"containerd"}
    assert ("app.kubernetes.io/name", "checkout") in pod.labels
    pending = json.loads(watch_lines("watch-events.jsonl")[0])["object"]
    assert pod_from_json(pending).containers == ()  # not started: no containerID yet
    with pytest.raises(ValueError):
        pod_from_json({"metadata": {}})
