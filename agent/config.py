"""One typed configuration object, built from defaults < config file < environment < flags.

Every option is declared once in OPTIONS: its flag, parser, default and help text. The CLI,
the config-file loader and the environment loader are generated from that table, so an
option cannot be parsed and then ignored. Config has a typed field per option (so mypy
checks every use); a unit test holds the two to the same names, types and defaults.
Errors name the field and where it came from.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from agent.labels.relabel import RelabelConfig, parse_relabel_configs

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and its source."""


def parse_duration(value: Any) -> float:
    """Seconds from 30, "30", "30s", "5m", "24h", "7d"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int no float holds
            raise ValueError("too long a duration") from None
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", str(value))
        if not match:
            raise ValueError(f"expected a duration like 10s, 5m or 24h, got {value!r}")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    if not 0 < seconds < math.inf:  # also refuses YAML's .nan and .inf
        raise ValueError(f"must be positive and finite, got {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from 1048576, "512MiB", "1G"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in SIZE_UNITS:
            raise ValueError(f"expected a size like 512MiB or 2GiB, got {value!r}")
        size = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return size


def duration_in(low: float, high: float) -> Callable[[Any], float]:
    """parse_duration within [low, high] seconds (a 1 ms window would spin the agent)."""

    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if not low <= seconds <= high:
            raise ValueError(
                f"must be between {_seconds_text(low)} and {_seconds_text(high)}, got {value!r}"
            )
        return seconds

    return convert


def size_in(low: int, high: int) -> Callable[[Any], int]:
    """parse_size within [low, high] bytes."""

    def convert(value: Any) -> int:
        size = parse_size(value)
        if not low <= size <= high:
            raise ValueError(
                f"must be between {_size_text(low)} and {_size_text(high)}, got {value!r}"
            )
        return size

    return convert


def _seconds_text(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds / length:g}{unit}"
    return f"{seconds * 1000:g}ms"


def _size_text(size: int) -> str:
    for unit, length in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= length and size % length == 0:
            return f"{size // length}{unit}"
    return f"{size}B"


def int_in(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not re.fullmatch(r"\s*-?[0-9]+\s*", str(value)):
            raise ValueError(f"expected an integer, got {value!r}")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return convert


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def split_host_port(address: str, *, listening: bool = False) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPv6]:PORT (brackets dropped); ValueError otherwise.

    The one parser of addresses: the admin HTTP address and the remote store's. A host
    has no whitespace, and a colon only as a bracketed IPv6 literal; the port is ASCII
    decimal, 1-65535, or 0 (the kernel picks one) for a `listening` address.
    """
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: [{host}] is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{address!r} is not HOST:PORT (an IPv6 host goes in brackets)")
    if not sep or not host or not re.fullmatch(r"[0-9]+", port_text):
        raise ValueError(f"{address!r} is not HOST:PORT")
    if re.search(r"\s", host):
        raise ValueError(f"{address!r}: the host has whitespace")
    port, lowest = int(port_text), 0 if listening else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"{address!r}: port out of range ({lowest}-65535)")
    return host, port


def parse_address(value: Any) -> str:
    """A HOST:PORT to listen on (port 0: any free port), kept as written."""
    split_host_port(str(value), listening=True)
    return str(value)


def parse_text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if str(value) not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def parse_url_list(value: Any) -> tuple[str, ...]:
    """Space- or comma-separated URLs (DEBUGINFOD_URLS style), or a YAML list."""
    items = value if isinstance(value, list) else re.split(r"[\s,]+", str(value))
    urls = tuple(str(item).rstrip("/") for item in items if str(item).strip())
    for url in urls:
        if not re.match(r"^https?://", url):
            raise ValueError(f"expected http:// or https:// URLs, got {url!r}")
    return urls


def parse_headers(value: Any) -> tuple[tuple[str, str], ...]:
    """gRPC headers: a YAML mapping, or "key=value,key2=value2"."""
    if isinstance(value, dict):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in str(value).split(","))):
            key, sep, val = item.partition("=")
            if not sep or not key:
                raise ValueError(f"expected key=value pairs, got {item!r}")
            pairs.append((key.strip(), val.strip()))
    for key, _ in pairs:
        if not re.fullmatch(r"[0-9a-z_.\-]+", key):
            raise ValueError(f"gRPC header names are lowercase [0-9a-z_.-], got {key!r}")
    return tuple(pairs)


def parse_relabel_list(value: Any) -> list[RelabelConfig]:
    return parse_relabel_configs(value, where="relabel_configs")


@dataclass(frozen=True)
class Option:
    name: str  # the Config field; flag is --name-with-dashes, env STROBE_NAME
    parse: Callable[[Any], Any]
    default: Any
    help: str
    commands: tuple[str, ...] = ("run",)
    flag: bool = True  # False: config file only (structured values)
    metavar: str | None = None


RUN, RECORD, TOP = "run", "record", "top"
BOTH = (RUN, RECORD, TOP)  # options every sampling command takes

OPTIONS: tuple[Option, ...] = (
    Option("frequency", int_in(1, 1000), 19, "Samples per second per CPU.", BOTH, metavar="HZ"),
    Option(
        "unwinder",
        parse_choice("fp", "dwarf", "auto"),
        "auto",
        "User stacks: fp (frame pointers), dwarf (.eh_frame tables walked in BPF, frame "
        "pointers where no table), auto (dwarf if the kernel accepts the walker, else fp).",
        BOTH,
        metavar="MODE",
    ),
    Option(
        "unwind_table_rows",
        int_in(1024, 100_000_000),
        2_000_000,
        "Unwind table rows kept in BPF for all binaries (8 bytes each).",
        BOTH,
        metavar="N",
    ),
    Option(
        "no_python_frames",
        parse_bool,
        False,
        "Native frames only for Python processes. By default the stacks of CPython "
        "3.8-3.13 processes carry their Python functions, files and lines, read in BPF "
        "and merged with the native frames (with --unwinder dwarf or auto).",
        BOTH,
        metavar="BOOL",
    ),
    Option(
        "off_cpu",
        parse_bool,
        False,
        "Also record off-CPU time: where threads block (sleeps, locks, I/O waits) and for "
        "how long, from the scheduler's switch events, with the same unwinders. run adds "
        'off-CPU series (label profile_type="off-cpu"); record writes the off-CPU profile '
        "[samples/count, off_cpu/nanoseconds] instead of the CPU one.",
        (RUN, RECORD),
        metavar="BOOL",
    ),
    Option(
        "off_cpu_min_block",
        duration_in(0.000001, 60.0),
        0.001,
        "With --off-cpu: blocked intervals shorter than this are not counted (e.g. 1ms, 0.1ms).",
        (RUN, RECORD),
        metavar="DURATION",
    ),
    Option(
        "off_cpu_max_rate",
        int_in(0, 1_000_000),
        1000,
        "With --off-cpu: blocking context switches whose stacks are walked, at most, per "
        "second per CPU (each walk costs ~2 us). Beyond it they are sampled at random and "
        "each counts for those it stands for (an unbiased estimate). 0: walk every one.",
        (RUN, RECORD),
        metavar="N",
    ),
    Option(
        "window",
        duration_in(1.0, 3600.0),
        10.0,
        "Length of one profile window (e.g. 10s).",
        metavar="DURATION",
    ),
    Option(
        "local_store",
        parse_text,
        "/var/lib/strobe/profiles",
        "Directory of the local profile store (the default sink).",
        metavar="DIR",
    ),
    Option(
        "local_store_max_bytes",
        size_in(1024**2, 1024**5),
        1024**3,
        "Local store retention by total size (e.g. 1GiB).",
        metavar="SIZE",
    ),
    Option(
        "local_store_max_age",
        duration_in(60.0, 3650 * 86400.0),
        7 * 86400.0,
        "Local store retention by age (e.g. 7d).",
        metavar="DURATION",
    ),
    Option(
        "no_local_store",
        parse_bool,
        False,
        "Do not keep profiles locally (needs a remote store).",
        metavar="BOOL",
    ),
    Option(
        "http_address",
        parse_address,
        "127.0.0.1:7071",
        "Admin HTTP address: /metrics, /healthz, /readyz. Loopback unless a token is set.",
        metavar="HOST:PORT",
    ),
    Option(
        "http_token_file",
        parse_text,
        "",
        "File holding a bearer token the admin HTTP endpoints require; needed for a "
        "non-loopback --http-address. Unset: /debug/pprof/* still needs a token, generated "
        "once into cache_dir/admin-token (mode 0600).",
        metavar="FILE",
    ),
    Option(
        "max_profile_seconds",
        duration_in(1.0, 3600.0),
        60.0,
        "Longest capture /debug/pprof/profile?seconds=N may ask for.",
        metavar="DURATION",
    ),
    Option(
        "remote_store_address",
        parse_text,
        "",
        "Ship profiles to this gRPC backend (HOST:PORT); off when empty.",
        metavar="HOST:PORT",
    ),
    Option(
        "remote_store_protocol",
        parse_choice("parca", "otlp"),
        "parca",
        "Backend protocol: parca (ProfileStoreService/WriteRaw) or otlp (ProfilesService).",
        metavar="PROTOCOL",
    ),
    Option(
        "remote_store_insecure",
        parse_bool,
        False,
        "Plaintext gRPC (TLS is on by default).",
        metavar="BOOL",
    ),
    Option(
        "remote_store_insecure_skip_verify",
        parse_bool,
        False,
        "TLS without checking the server's certificate (encrypts, does not authenticate).",
        metavar="BOOL",
    ),
    Option(
        "remote_store_ca_file",
        parse_text,
        "",
        "CA bundle for the backend's certificate.",
        metavar="FILE",
    ),
    Option(
        "remote_store_cert_file",
        parse_text,
        "",
        "Client certificate for mutual TLS.",
        metavar="FILE",
    ),
    Option("remote_store_key_file", parse_text, "", "Client key for mutual TLS.", metavar="FILE"),
    Option(
        "remote_store_bearer_token_file",
        parse_text,
        "",
        "File with a bearer token, re-read when it changes (else "
        "$STROBE_REMOTE_STORE_BEARER_TOKEN).",
        metavar="FILE",
    ),
    Option(
        "remote_store_headers",
        parse_headers,
        (),
        "Extra gRPC metadata, key=value[,key=value].",
        metavar="HEADERS",
    ),
    Option(
        "remote_store_timeout",
        duration_in(0.1, 600.0),
        30.0,
        "Deadline of one gRPC request.",
        metavar="DURATION",
    ),
    Option(
        "remote_store_max_message_bytes",
        size_in(64 * 1024, 2 * 1024**3 - 1),
        32 * 1024**2,
        "Largest gRPC message sent.",
        metavar="SIZE",
    ),
    Option(
        "remote_store_queue_max_bytes",
        size_in(1024**2, 64 * 1024**3),
        32 * 1024**2,
        "Memory bound of the send queue.",
        metavar="SIZE",
    ),
    Option(
        "remote_store_spool_dir",
        parse_text,
        "",
        "Disk spool for profiles the backend has not accepted yet (survives restarts).",
        metavar="DIR",
    ),
    Option(
        "remote_store_spool_max_bytes",
        size_in(1024**2, 1024**5),
        256 * 1024**2,
        "Disk bound of the spool.",
        metavar="SIZE",
    ),
    Option(
        "kubeconfig",
        parse_text,
        "",
        "kubeconfig for pod labels (default: the in-cluster service account, if any).",
        metavar="FILE",
    ),
    Option(
        "relabel_configs",
        parse_relabel_list,
        None,
        "Prometheus relabel_configs turning discovery labels into series labels "
        "(config file only; default: node, namespace, pod, container, container_id, "
        "systemd_unit, comm).",
        flag=False,
    ),
    Option(
        "max_series_per_window",
        int_in(1, 1_000_000),
        1000,
        "Cap on distinct series per window; the excess folds into one overflow series.",
        metavar="N",
    ),
    Option(
        "debuginfod_urls",
        parse_url_list,
        (),
        "debuginfod servers for missing debug files and executables "
        "(space-separated; default: $DEBUGINFOD_URLS).",
        BOTH,
        metavar="URLS",
    ),
    Option(
        "symbol_cache_max_bytes",
        size_in(1024**2, 1024**5),
        1 << 30,
        "Disk bound of the symbol index cache under cache_dir/symbols (least recently used out).",
        BOTH,
        metavar="SIZE",
    ),
    Option(
        "cache_dir",
        parse_text,
        "/var/cache/strobe",
        "Cache directory (kernel header tree, symbol indexes, downloads).",
        BOTH,
        metavar="DIR",
    ),
    Option(
        "node_name",
        parse_text,
        "",
        "Node name label (default: $NODE_NAME or hostname).",
        BOTH,
        metavar="NAME",
    ),
    Option(
        "log_level",
        parse_choice("debug", "info", "warning", "error"),
        "info",
        "Log verbosity.",
        BOTH,
        metavar="LEVEL",
    ),
)

OPTION_BY_NAME = {option.name: option for option in OPTIONS}


def _defaults() -> dict[str, Any]:
    return {option.name: option.default for option in OPTIONS}


def _default(name: str) -> Any:
    return OPTION_BY_NAME[name].default


@dataclass(frozen=True)
class Config:
    """The validated configuration: one typed field per option of OPTIONS, in its order,
    defaulting to the option's default (tests/unit/test_config.py keeps the two in step:
    each field's type is what its option's parser returns), and where each came from."""

    frequency: int = _default("frequency")
    unwinder: str = _default("unwinder")
    unwind_table_rows: int = _default("unwind_table_rows")
    no_python_frames: bool = _default("no_python_frames")
    off_cpu: bool = _default("off_cpu")
    off_cpu_min_block: float = _default("off_cpu_min_block")
    off_cpu_max_rate: int = _default("off_cpu_max_rate")
    window: float = _default("window")
    local_store: str = _default("local_store")
    local_store_max_bytes: int = _default("local_store_max_bytes")
    local_store_max_age: float = _default("local_store_max_age")
    no_local_store: bool = _default("no_local_store")
    http_address: str = _default("http_address")
    http_token_file: str = _default("http_token_file")
    max_profile_seconds: float = _default("max_profile_seconds")
    remote_store_address: str = _default("remote_store_address")
    remote_store_protocol: str = _default("remote_store_protocol")
    remote_store_insecure: bool = _default("remote_store_insecure")
    remote_store_insecure_skip_verify: bool = _default("remote_store_insecure_skip_verify")
    remote_store_ca_file: str = _default("remote_store_ca_file")
    remote_store_cert_file: str = _default("remote_store_cert_file")
    remote_store_key_file: str = _default("remote_store_key_file")
    remote_store_bearer_token_file: str = _default("remote_store_bearer_token_file")
    remote_store_headers: tuple[tuple[str, str], ...] = _default("remote_store_headers")
    remote_store_timeout: float = _default("remote_store_timeout")
    remote_store_max_message_bytes: int = _default("remote_store_max_message_bytes")
    remote_store_queue_max_bytes: int = _default("remote_store_queue_max_bytes")
    remote_store_spool_dir: str = _default("remote_store_spool_dir")
    remote_store_spool_max_bytes: int = _default("remote_store_spool_max_bytes")
    kubeconfig: str = _default("kubeconfig")
    relabel_configs: list[RelabelConfig] | None = _default("relabel_configs")
    max_series_per_window: int = _default("max_series_per_window")
    debuginfod_urls: tuple[str, ...] = _default("debuginfod_urls")
    symbol_cache_max_bytes: int = _default("symbol_cache_max_bytes")
    cache_dir: str = _default("cache_dir")
    node_name: str = _default("node_name")
    log_level: str = _default("log_level")
    sources: Mapping[str, str] = field(default_factory=dict)  # field -> where it came from

    @property
    def values(self) -> dict[str, Any]:
        """Every option's value by name (for code that walks all of them)."""
        return {option.name: getattr(self, option.name) for option in OPTIONS}

    def with_values(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @property
    def resolved_node_name(self) -> str:
        return self.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def _convert(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {option.name}: {exc}") from None


def load_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file. Keys are option names (dashes or underscores)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text: {exc}") from None
    # PyYAML also raises ValueError (a timestamp like 2001-02-30, "!!int abc") and, on
    # deeply nested flow collections, RecursionError.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_BY_NAME:
            raise ConfigError(f"config file {path}: {key}: unknown option")
        out[name] = _convert(OPTION_BY_NAME[name], value, f"config file {path}")
    return out


def load_env(environ: Mapping[str, str], command: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for option in OPTIONS:
        key = "STROBE_" + option.name.upper()
        if option.flag and command in option.commands and key in environ:
            out[option.name] = _convert(option, environ[key], f"environment {key}")
    return out


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Flags for every option of `command`; all default to None so the file can fill in."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML config file; flags override it, it overrides defaults.",
    )
    for option in OPTIONS:
        if not option.flag or command not in option.commands:
            continue
        dest = option.name
        flag = "--" + option.name.replace("_", "-")
        help_text = f"{option.help} (default: {_show_default(option)})"
        if option.parse is parse_bool:
            parser.add_argument(
                flag, dest=dest, action="store_const", const=True, default=None, help=help_text
            )
        else:
            parser.add_argument(
                flag, dest=dest, default=None, metavar=option.metavar, help=help_text
            )


def _show_default(option: Option) -> str:
    if option.name == "node_name":
        return "$NODE_NAME or the hostname"
    return repr(option.default) if option.default not in ("", None) else "none"


def build_config(
    args: argparse.Namespace, command: str, environ: Mapping[str, str] | None = None
) -> Config:
    values = _defaults()
    sources = {name: "default" for name in values}
    config_path = getattr(args, "config", None)
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_path is not None:
        layers.append(("file", load_file(config_path)))
    layers.append(("environment", load_env(os.environ if environ is None else environ, command)))
    flag_values = {}
    for option in OPTIONS:
        raw = getattr(args, option.name, None)
        if raw is not None:
            flag_values[option.name] = _convert(
                option, raw, "flag --" + option.name.replace("_", "-")
            )
    layers.append(("flag", flag_values))
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    config = Config(**values, sources=sources)
    validate(config, command)
    return config


def validate(config: Config, command: str) -> None:
    """Checks that involve more than one field."""
    if command == RUN and config.no_local_store and not config.remote_store_address:
        raise ConfigError("no_local_store: needs remote_store_address, or profiles go nowhere")
