"""Pod metadata for this node, kept current by a LIST + WATCH of the API server.

A background thread lists `/api/v1/pods?fieldSelector=spec.nodeName=<node>`, then
watches from the list's resourceVersion (JSON lines of ADDED / MODIFIED / DELETED /
BOOKMARK / ERROR). It relists on 410 Gone and every `resync_seconds`, and reconnects
with exponential backoff and jitter. Lookups never block on the network: while the API
is unreachable they answer from what was last known (or not at all), labels then come
from cgroups only, strobe_kubernetes_api_up is 0 and one log line says so.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

from agent import metrics
from agent.labels.cgroup import CONTAINERD, CRIO, DOCKER
from agent.labels.kubeconfig import ApiConnection

log = logging.getLogger(__name__)

_SCHEME_RUNTIMES = {"containerd": CONTAINERD, "cri-o": CRIO, "docker": DOCKER}
_STATUS_LISTS = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")


@dataclass(frozen=True)
class ContainerMetadata:
    container_id: str  # bare id, without the "<runtime>://" scheme
    name: str
    runtime: str  # containerd | cri-o | docker | the scheme as given


@dataclass(frozen=True)
class PodMetadata:
    uid: str
    namespace: str
    name: str
    node_name: str
    labels: tuple[tuple[str, str], ...] = ()
    containers: tuple[ContainerMetadata, ...] = ()

    def container(self, container_id: str) -> ContainerMetadata | None:
        return next((c for c in self.containers if c.container_id == container_id), None)


class PodMetadataSource(Protocol):
    """Where the labeler asks which pod a process belongs to. Must not block."""

    def pod(self, pod_uid: str, container_id: str) -> PodMetadata | None:
        """The pod running `container_id` (preferred) or with `pod_uid`; None if unknown."""
        ...


def pod_from_json(obj: Any) -> PodMetadata:
    """A Pod object as the API server sends it; ValueError when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise ValueError("not a Pod object")
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    if not meta.get("uid"):
        raise ValueError("pod without metadata.uid")
    containers = []
    for key in _STATUS_LISTS:
        for entry in status.get(key) or []:
            scheme, _, bare_id = str(entry.get("containerID") or "").partition("://")
            if bare_id:
                runtime = _SCHEME_RUNTIMES.get(scheme, scheme)
                containers.append(ContainerMetadata(bare_id, str(entry.get("name", "")), runtime))
    labels = meta.get("labels") or {}
    return PodMetadata(
        uid=str(meta["uid"]),
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        node_name=str(spec.get("nodeName", "")),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        containers=tuple(containers),
    )


class PodCache:
    """Pods by UID and by container id; safe to read while the watch thread writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, PodMetadata] = {}
        self._by_container: dict[str, str] = {}  # container id -> pod uid

    def replace_all(self, pods: list[PodMetadata]) -> None:
        with self._lock:
            self._by_uid = {pod.uid: pod for pod in pods}
            self._by_container = {c.container_id: p.uid for p in pods for c in p.containers}
        metrics.KUBERNETES_PODS.set(len(pods))

    def upsert(self, pod: PodMetadata) -> None:
        with self._lock:
            self._forget(pod.uid)
            self._by_uid[pod.uid] = pod
            for container in pod.containers:
                self._by_container[container.container_id] = pod.uid
            count = len(self._by_uid)
        metrics.KUBERNETES_PODS.set(count)

    def remove(self, uid: str) -> None:
        with self._lock:
            self._forget(uid)
            count = len(self._by_uid)
        metrics.KUBERNETES_PODS.set(count)

    def pod(self, pod_uid: str, container_id: str) -> PodMetadata | None:
        with self._lock:
            uid = self._by_container.get(container_id, pod_uid) if container_id else pod_uid
            return self._by_uid.get(uid) if uid else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_uid)

    def _forget(self, uid: str) -> None:
        old = self._by_uid.pop(uid, None)
        for container in old.containers if old else ():
            if self._by_container.get(container.container_id) == uid:
                del self._by_container[container.container_id]


class ApiError(Exception):
    """The API server answered, but not with what we asked for."""


class _Gone(Exception):
    """410: our resourceVersion is too old to watch from; relist."""


class _Stopped(Exception):
    pass


class KubernetesPodWatcher:
    """Keeps a PodCache of this node's pods in a background thread. Use as a PodMetadataSource."""

    def __init__(
        self,
        connection: ApiConnection,
        node_name: str,
        *,
        resync_seconds: float = 600.0,
        watch_timeout_seconds: int = 300,
        request_timeout_seconds: float = 30.0,
        backoff_initial_seconds: float = 0.5,
        backoff_max_seconds: float = 60.0,
    ) -> None:
        if not node_name:
            raise ValueError("KubernetesPodWatcher needs the node name to select its pods")
        self.connection = connection
        self.node_name = node_name
        self.cache = PodCache()
        self.resync_seconds = resync_seconds
        self.watch_timeout_seconds = watch_timeout_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.backoff_initial_seconds = backoff_initial_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.resource_version = ""  # "" until listed, and after 410 Gone
        self.up = False
        self._down_logged = False  # one warning per outage, not one per retry
        self._next_resync = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="strobe-k8s-watch", daemon=True)

    def start(self) -> KubernetesPodWatcher:
        metrics.KUBERNETES_UP.set(0)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread promptly: wakes it from a backoff wait or a blocked watch read."""
        with self._lock:
            self._stop.set()
            if self._active is not None and self._active.sock is not None:
                # A plain socket shutdown, under TLS too: the blocked reader sees EOF.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._active.sock, socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(timeout)
        metrics.KUBERNETES_UP.set(0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def pod(self, pod_uid: str, container_id: str) -> PodMetadata | None:
        return self.cache.pod(pod_uid, container_id)

    # The watch thread.

    def _run(self) -> None:
        backoff = self.backoff_initial_seconds
        while not self._stop.is_set():
            try:
                if not self.resource_version or time.monotonic() >= self._next_resync:
                    self._list()
                    backoff = self.backoff_initial_seconds
                if self._watch():
                    backoff = self.backoff_initial_seconds
                    continue
            except _Stopped:
                break
            except _Gone:
                log.info("pod watch: resourceVersion %s expired; relisting", self.resource_version)
                self.resource_version = ""
                continue
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any reply
                if self._stop.is_set():
                    break
                log.debug("pod watch: %s: %s", type(exc).__name__, exc)
            self._stop.wait(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, self.backoff_max_seconds)

    def _list(self) -> None:
        query = urlencode({"fieldSelector": f"spec.nodeName={self.node_name}"})
        conn, response = self._open(f"/api/v1/pods?{query}", self.request_timeout_seconds)
        try:
            body = json.loads(response.read())
        finally:
            self._release(conn)
        if not isinstance(body, dict) or body.get("kind") != "PodList":
            raise ApiError(f"LIST pods: expected a PodList, got {str(body)[:200]}")
        pods = []
        for item in body.get("items") or []:
            try:
                pods.append(pod_from_json(item))
            except ValueError as exc:
                log.debug("LIST pods: skipping an item: %s", exc)
        self.cache.replace_all(pods)
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        self._next_resync = time.monotonic() + self.resync_seconds
        self._mark_up()

    def _watch(self) -> bool:
        """Follow one watch stream to its end; False (back off) if it made no progress.

        Progress is an event, or a clean end after a while (the server's timeoutSeconds):
        a stream that ends at once without events must not turn into a request loop.
        """
        started = time.monotonic()
        remaining = max(1, int(self._next_resync - time.monotonic()))
        timeout = min(self.watch_timeout_seconds, remaining)
        query = urlencode(
            {
                "watch": "1",
                "fieldSelector": f"spec.nodeName={self.node_name}",
                "resourceVersion": self.resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(timeout),
            }
        )
        read_timeout = timeout + self.request_timeout_seconds
        conn, response = self._open(f"/api/v1/pods?{query}", read_timeout)
        events = 0
        try:
            while line := response.readline():
                if line.strip():
                    self._apply(json.loads(line))
                    events += 1
            return events > 0 or time.monotonic() - started >= 1.0
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self._stop.is_set():
                raise _Stopped from exc
            log.debug("pod watch stream broke after %d events: %s", events, exc)
            return events > 0
        finally:
            self._release(conn)

    def _apply(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == 410:
                raise _Gone
            raise ApiError(f"watch ERROR event: {json.dumps(obj)[:300]}")
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") or not isinstance(obj, dict):
            raise ValueError(f"unexpected watch event {str(event)[:200]}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            pass
        elif kind == "DELETED":
            self.cache.remove(pod_from_json(obj).uid)
        else:
            self.cache.upsert(pod_from_json(obj))
        if version:
            self.resource_version = str(version)

    def _open(
        self, path: str, timeout: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        try:
            conn = self.connection.open(timeout)
        except OSError as exc:
            if self._stop.is_set():
                raise _Stopped from exc
            self._mark_down(f"cannot connect to {self.connection.server}: {exc}")
            raise
        with self._lock:
            if self._stop.is_set():
                conn.close()
                raise _Stopped
            self._active = conn
        try:
            conn.request(
                "GET", self.connection.path_prefix + path, headers=self.connection.headers()
            )
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._release(conn)
            if self._stop.is_set():
                raise _Stopped from exc
            self._mark_down(f"{self.connection.server}: {exc}")
            raise
        if response.status == 200:
            return conn, response
        detail = _status_message(response)
        self._release(conn)
        if response.status == 410:
            raise _Gone
        self._mark_down(f"HTTP {response.status} from {self.connection.server}: {detail}")
        raise ApiError(f"HTTP {response.status}: {detail}")

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if self._active is conn:
                self._active = None
        conn.close()

    def _mark_up(self) -> None:
        if not self.up:
            log.info(
                "Kubernetes API reachable: %d pods on node %s", len(self.cache), self.node_name
            )
        self.up, self._down_logged = True, False
        metrics.KUBERNETES_UP.set(1)

    def _mark_down(self, reason: str) -> None:
        metrics.KUBERNETES_UP.set(0)
        if not self._down_logged:
            log.warning(
                "Kubernetes API unreachable (%s): pod labels come from cgroups only until it "
                "is back; retrying with backoff",
                reason,
            )
        self.up, self._down_logged = False, True


def _status_message(response: http.client.HTTPResponse) -> str:
    """The `message` of a Kubernetes Status body, else the start of the body."""
    try:
        body = response.read(64 * 1024)
        status = json.loads(body)
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
        return body[:200].decode(errors="replace")
    except (OSError, ValueError, http.client.HTTPException):
        return response.reason
