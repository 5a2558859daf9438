"""Configuration of the remote-store sink: one typed, validated value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.config import split_host_port

PROTOCOLS = ("parca", "otlp")
TOKEN_ENV = "STROBE_REMOTE_STORE_BEARER_TOKEN"
MiB = 1024 * 1024


@dataclass(frozen=True)
class RemoteStoreConfig:
    """Where and how profiles are shipped. Validated on construction (ValueError).

    Defaults size the buffers for a 10-minute backend outage with room to spare: one
    profile per series per 10 s window, 5 series of ~100 KiB each is ~30 MiB in 10 min,
    which the in-memory queue (32 MiB) alone holds. With the optional disk spool
    (256 MiB) every profile is on disk before write() returns (memory then only caches
    the spool's head), which covers well over an hour and survives kill -9.
    """

    address: str  # HOST:PORT of the gRPC endpoint
    protocol: str = "parca"  # "parca" (WriteRaw) or "otlp" (ProfilesService/Export)
    insecure: bool = False  # plaintext gRPC; TLS is on by default
    ca_file: str = ""  # PEM roots to verify the server with (default: system roots)
    cert_file: str = ""  # client certificate (mutual TLS), needs key_file
    key_file: str = ""
    insecure_skip_verify: bool = False  # see channel.py: pins the certificate the server shows
    bearer_token_file: str = ""  # re-read whenever its mtime changes
    bearer_token: str = ""  # default: $STROBE_REMOTE_STORE_BEARER_TOKEN (file wins)
    headers: Mapping[str, str] = field(default_factory=dict)  # extra gRPC metadata
    max_message_bytes: int = 32 * MiB  # larger requests are dropped, never sent
    timeout_seconds: float = 30.0  # per request
    queue_max_bytes: int = 32 * MiB  # in-memory queue bound
    spool_dir: str = ""  # disk spool directory; "" = no spool (drop oldest when full)
    spool_max_bytes: int = 256 * MiB
    node: str = ""  # this node's name: OTLP host.name; Parca `node` label if absent
    # Parca WriteRawRequest.normalized: False because agent/pprof/builder.py writes runtime
    # addresses with their mapping's start/limit/offset (pprof convention), which Parca
    # then normalizes itself; True only for a pprof whose addresses are file-relative.
    normalized: bool = False
    # Default budget of close() to deliver what is queued: short, so that with the
    # stop of the sender (<= 0.5 s) the sink's part of an exit stays within ~2 s.
    close_timeout_seconds: float = 1.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 30.0
    backoff_resource_exhausted_seconds: float = 5.0  # first delay after RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ValueError("remote store: " + "; ".join(problems))

    @property
    def static_token(self) -> str:
        """The bearer token when no token file is set: the field, else the environment."""
        return self.bearer_token or os.environ.get(TOKEN_ENV, "")


def _problems(config: RemoteStoreConfig) -> list[str]:
    problems = []
    try:
        split_host_port(config.address)
    except ValueError as exc:
        problems.append(f"address {exc}")
    if config.protocol not in PROTOCOLS:
        problems.append(f"protocol {config.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if bool(config.cert_file) != bool(config.key_file):
        problems.append("cert_file and key_file go together (mutual TLS)")
    if config.insecure and (config.ca_file or config.cert_file or config.insecure_skip_verify):
        problems.append("insecure (plaintext) excludes ca_file, cert_file, insecure_skip_verify")
    if config.insecure_skip_verify and config.ca_file:
        problems.append("insecure_skip_verify excludes ca_file")
    for name in ("max_message_bytes", "queue_max_bytes", "spool_max_bytes"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be positive")
    for name in (
        "timeout_seconds",
        "close_timeout_seconds",
        "backoff_initial_seconds",
        "backoff_max_seconds",
        "backoff_resource_exhausted_seconds",
    ):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be positive")
    for key in config.headers:
        if key != key.lower() or not key or key.startswith(":"):
            problems.append(f"header {key!r}: gRPC metadata keys are lowercase, not pseudo-headers")
    return problems
