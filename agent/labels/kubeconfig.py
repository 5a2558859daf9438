"""How to reach the Kubernetes API server: in-cluster service account or a kubeconfig.

Only the stdlib (http.client + ssl) and PyYAML: the agent must not pull the official
client (and its dependency tree) into a privileged host daemon.
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubernetesConfigError(ValueError):
    """No usable way to reach the API server; the message says what is missing."""


@dataclass(frozen=True, eq=False)
class ApiConnection:
    """Where the API server is and how to authenticate; opens one HTTP(S) connection."""

    server: str  # "https://host:port[/path-prefix]"
    ssl_context: ssl.SSLContext | None = None  # None: plain http (tests, kubectl proxy)
    token: str = ""
    token_file: str = ""  # re-read on every request: bound service-account tokens rotate
    basic_auth: str = ""  # "user:password"
    _parts: Any = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KubernetesConfigError(f"server: {self.server!r} is not an http(s) URL")
        object.__setattr__(self, "_parts", parts)

    @property
    def path_prefix(self) -> str:
        return str(self._parts.path).rstrip("/")

    def open(self, timeout: float) -> http.client.HTTPConnection:
        """A connected (not yet requested) connection to the server."""
        host, port = self._parts.hostname, self._parts.port
        if self._parts.scheme == "https":
            context = self.ssl_context or ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.connect()
        return conn

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        headers = {"Accept": "application/json", "User-Agent": "strobe-agent"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self.basic_auth:
            encoded = base64.b64encode(self.basic_auth.encode()).decode()
            headers["Authorization"] = f"Basic {encoded}"
        return headers


def discover_connection(
    kubeconfig: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> ApiConnection | None:
    """The kubeconfig if one is named, else the in-cluster account if there is one, else None."""
    if kubeconfig:
        return load_kubeconfig(Path(kubeconfig))
    if environ.get("KUBERNETES_SERVICE_HOST") and (service_account_dir / "token").exists():
        return load_in_cluster(environ, service_account_dir)
    return None


def load_in_cluster(
    environ: Mapping[str, str] = os.environ, service_account_dir: Path = SERVICE_ACCOUNT_DIR
) -> ApiConnection:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, its token and CA."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubernetesConfigError("KUBERNETES_SERVICE_HOST is not set: not running in a pod")
    token_file = service_account_dir / "token"
    ca_file = service_account_dir / "ca.crt"
    for required in (token_file, ca_file):
        if not required.is_file():
            raise KubernetesConfigError(f"in-cluster config: {required} is missing")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    context = ssl.create_default_context(cafile=str(ca_file))
    return ApiConnection(f"https://{host}:{port}", context, token_file=str(token_file))


def load_kubeconfig(path: Path, context_name: str | None = None) -> ApiConnection:
    """A standard kubeconfig file: its current (or the named) context's cluster and user."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubernetesConfigError(f"kubeconfig {path}: cannot read: {exc}") from exc
    if not isinstance(config, dict):
        raise KubernetesConfigError(f"kubeconfig {path}: not a mapping")
    name = context_name or config.get("current-context")
    if not name:
        raise KubernetesConfigError(f"kubeconfig {path}: no current-context")
    context = _named(config, "contexts", "context", str(name), path)
    cluster = _named(config, "clusters", "cluster", str(context.get("cluster", "")), path)
    user = _named(config, "users", "user", str(context.get("user", "")), path, optional=True)
    return _connection(cluster, user, path.parent, path)


def _named(
    config: dict[str, Any], section: str, key: str, name: str, path: Path, optional: bool = False
) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise KubernetesConfigError(f"kubeconfig {path}: {section}[{name}] is malformed")
            return value
    if optional and not name:
        return {}
    raise KubernetesConfigError(f"kubeconfig {path}: no {key} named {name!r} in {section}")


def _connection(
    cluster: dict[str, Any], user: dict[str, Any], base: Path, path: Path
) -> ApiConnection:
    server = str(cluster.get("server", ""))
    if not server:
        raise KubernetesConfigError(f"kubeconfig {path}: the cluster has no server")
    if "exec" in user or "auth-provider" in user:
        raise KubernetesConfigError(
            f"kubeconfig {path}: exec/auth-provider credentials are not supported; "
            "use a token, token file or client certificate"
        )
    token_file = str(_resolve(base, user["tokenFile"])) if user.get("tokenFile") else ""
    basic = f"{user['username']}:{user.get('password', '')}" if user.get("username") else ""
    context = _ssl_context(cluster, user, base, path) if server.startswith("https:") else None
    return ApiConnection(
        server,
        context,
        token=str(user.get("token", "")),
        token_file=token_file,
        basic_auth=basic,
    )


def _ssl_context(
    cluster: dict[str, Any], user: dict[str, Any], base: Path, path: Path
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            context.load_verify_locations(cadata=ca)
        elif cluster.get("certificate-authority"):
            context.load_verify_locations(
                cafile=str(_resolve(base, cluster["certificate-authority"]))
            )
        _load_client_certificate(context, user, base)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise KubernetesConfigError(f"kubeconfig {path}: TLS settings: {exc}") from exc
    return context


def _load_client_certificate(context: ssl.SSLContext, user: dict[str, Any], base: Path) -> None:
    cert = _pem(user, "client-certificate", base)
    key = _pem(user, "client-key", base)
    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise ValueError("client-certificate and client-key must be given together")
    # ssl loads a cert chain only from files: write the PEMs to private files, then remove.
    with tempfile.TemporaryDirectory(prefix="strobe-kube-") as tmp:
        cert_file, key_file = Path(tmp, "client.crt"), Path(tmp, "client.key")
        for target, pem in ((cert_file, cert), (key_file, key)):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
        context.load_cert_chain(str(cert_file), str(key_file))


def _pem(user: dict[str, Any], key: str, base: Path) -> bytes | None:
    if user.get(f"{key}-data"):
        return base64.b64decode(user[f"{key}-data"])
    if user.get(key):
        return _resolve(base, user[key]).read_bytes()
    return None


def _resolve(base: Path, value: object) -> Path:
    """kubeconfig paths are relative to the kubeconfig file's directory."""
    candidate = Path(str(value)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate
