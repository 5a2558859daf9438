"""The gRPC channel to the remote store: TLS, the bearer token and call metadata.

TLS is on unless `insecure`. Server verification uses `ca_file` or the system roots;
`cert_file`/`key_file` add a client certificate (mutual TLS).

`insecure_skip_verify` (grpcio has no switch to skip verification) means exactly this:
when the channel is built, Strobe opens a plain TLS connection to the address, takes
the certificate the server presents, and makes it the only trusted root of the channel,
with the gRPC target name overridden to a name found in that certificate. So:
- traffic is encrypted, and the channel talks only to a server holding the key of
  that certificate;
- the certificate is not checked against any CA, nor its names against the address;
- it is trust on first use per channel: whoever answers when the channel is built is
  trusted (an active attacker at that moment wins) and gets the bearer token;
- certificates outside their validity period are still rejected;
- after a failed send (UNAVAILABLE) the channel is rebuilt, so a rotated server
  certificate is picked up again.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from agent.config import split_host_port
from agent.sinks.remote.config import RemoteStoreConfig

log = logging.getLogger(__name__)
Metadata = tuple[tuple[str, str], ...]


class TokenSource:
    """The bearer token: from a file re-read whenever its mtime changes, or static."""

    def __init__(self, path: str, static: str) -> None:
        self._path = path
        self._static = static.strip()
        self._mtime_ns: int | None = None
        self._token = ""
        self._lock = threading.Lock()

    def token(self) -> str:
        if not self._path:
            return self._static
        with self._lock:
            try:
                mtime_ns = os.stat(self._path).st_mtime_ns
                if mtime_ns != self._mtime_ns:
                    with open(self._path, encoding="utf-8") as handle:
                        self._token = handle.read().strip()
                    self._mtime_ns = mtime_ns
            except OSError as exc:  # keep the last good token; the send will tell
                log.warning("bearer token file %s: %s", self._path, exc.strerror)
            return self._token


def call_metadata(config: RemoteStoreConfig, tokens: TokenSource) -> Metadata:
    """Metadata for one call: extra headers plus `authorization: Bearer ...` when set."""
    pairs = [(key, value) for key, value in sorted(config.headers.items())]
    token = tokens.token()
    if token:
        pairs = [(k, v) for k, v in pairs if k != "authorization"]
        pairs.append(("authorization", f"Bearer {token}"))
    return tuple(pairs)


def channel_options(config: RemoteStoreConfig) -> list[tuple[str, Any]]:
    """Size limits, and gRPC's own reconnect backoff kept within ours."""
    max_backoff_ms = int(config.backoff_max_seconds * 1000)
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.initial_reconnect_backoff_ms", min(1000, max_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(1000, max_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
        ("grpc.enable_retries", 0),  # retries are ours: ordered, counted, spooled
    ]


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def fetch_server_certificate(address: str, timeout: float) -> tuple[bytes, str]:
    """(PEM, a name in it) of the certificate the server at `address` presents now."""
    host, port = split_host_port(address)
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    loose.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        loose.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    pem = ssl.DER_cert_to_PEM_cert(der)
    # Python decodes a certificate's names only after verifying it, so verify against itself.
    pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pinned.check_hostname = False
    pinned.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pinned.load_verify_locations(cadata=pem)
    pinned.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        pinned.wrap_socket(raw, server_hostname=host) as tls,
    ):
        decoded = tls.getpeercert()
    return pem.encode(), certificate_name(decoded or {}, host)


def certificate_name(decoded: dict[str, Any], fallback: str) -> str:
    """First DNS name, else first IP address, else the subject CN of a decoded certificate."""
    alt_names: Sequence[tuple[str, str]] = decoded.get("subjectAltName", ())
    for kind in ("DNS", "IP Address"):
        for name_kind, value in alt_names:
            if name_kind == kind:
                return value
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return fallback


def build_channel(config: RemoteStoreConfig) -> grpc.Channel:
    """A channel per the config; raises OSError/ssl.SSLError if skip-verify cannot connect."""
    options = channel_options(config)
    if config.insecure:
        return grpc.insecure_channel(config.address, options=options)
    client_key = _read(config.key_file) if config.key_file else None
    client_cert = _read(config.cert_file) if config.cert_file else None
    root: bytes | None = _read(config.ca_file) if config.ca_file else None
    if config.insecure_skip_verify:
        root, name = fetch_server_certificate(config.address, config.timeout_seconds)
        options.append(("grpc.ssl_target_name_override", name))
    credentials = grpc.ssl_channel_credentials(root, client_key, client_cert)
    return grpc.secure_channel(config.address, credentials, options=options)


def check_files(config: RemoteStoreConfig) -> None:
    """Fail at start, with the file's name, when a configured TLS file cannot be read."""
    for what in ("ca_file", "cert_file", "key_file"):
        path = getattr(config, what)
        if path:
            try:
                _read(path)
            except OSError as exc:
                raise ValueError(
                    f"remote store {what}: cannot read {path}: {exc.strerror}"
                ) from None


@dataclass(frozen=True)
class Outcome:
    """How one call ended: OK with the response bytes, or a status code and detail."""

    code: grpc.StatusCode
    detail: str = ""
    response: bytes = b""


class Transport:
    """One method on one lazily built channel; sends pre-serialized requests.

    Requests are bytes already (the queue and spool hold them encoded), so the call
    has no serializer; the response comes back as bytes too.
    """

    def __init__(self, config: RemoteStoreConfig, method: str) -> None:
        self.config = config
        self.method = method
        self.tokens = TokenSource(config.bearer_token_file, config.static_token)
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._future: Any = None
        self._cancelled = False
        self._lock = threading.Lock()

    def send(self, payload: bytes) -> Outcome:
        try:
            call = self._get_call()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            return Outcome(grpc.StatusCode.UNAVAILABLE, f"cannot connect: {exc}")
        metadata = call_metadata(self.config, self.tokens)
        future = call.future(payload, timeout=self.config.timeout_seconds, metadata=metadata)
        with self._lock:
            self._future = future
            if self._cancelled:
                future.cancel()
        try:
            return Outcome(grpc.StatusCode.OK, response=future.result())
        except grpc.FutureCancelledError:
            return Outcome(grpc.StatusCode.CANCELLED, "cancelled by close()")
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        finally:
            with self._lock:
                self._future = None

    def cancel(self) -> None:
        """Abort the call in flight, and any later one (used by close())."""
        with self._lock:
            self._cancelled = True
            if self._future is not None:
                self._future.cancel()

    def reset(self) -> None:
        """Drop the channel; the next send builds a new one (re-pins under skip-verify)."""
        with self._lock:
            channel, self._channel, self._call = self._channel, None, None
        if channel is not None:
            channel.close()

    close = reset

    def _get_call(self) -> Any:
        with self._lock:
            if self._call is not None:
                return self._call
        channel = build_channel(self.config)
        call = channel.unary_unary(self.method)
        with self._lock:
            self._channel, self._call = channel, call
        return call
