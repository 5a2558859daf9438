from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from agent.commands.cli import build_parser
from agent.config import (
    OPTIONS,
    Config,
    ConfigError,
    build_config,
    parse_duration,
    parse_size,
    split_host_port,
)
from tests.conftest import REPO


def config_for(argv: list[str], environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(argv)
    return build_config(args, args.command, environ=environ or {})


def test_defaults() -> None:
    config = config_for(["run"])
    assert config.frequency == 19
    assert config.window == 10.0
    assert config.http_address == "127.0.0.1:7071"
    assert config.sources["frequency"] == "default"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "strobe.yaml"
    file.write_text("frequency: 49\nwindow: 30s\nlocal-store-max-bytes: 2MiB\n")
    config = config_for(["run", "--config", str(file)], {"STROBE_WINDOW": "1m"})
    assert config.frequency == 49 and config.sources["frequency"] == "file"
    assert config.window == 60.0 and config.sources["window"] == "environment"
    assert config.local_store_max_bytes == 2 * 1024 * 1024
    flagged = config_for(["run", "--config", str(file), "--frequency", "99"])
    assert flagged.frequency == 99 and flagged.sources["frequency"] == "flag"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("frequency: 0\n", "frequency"),
        ("frequency: lots\n", "frequency"),
        ("window: -5s\n", "window"),
        ("http_address: nope\n", "http_address"),
        ("local_store_max_bytes: 12 parsecs\n", "local_store_max_bytes"),
        ("no_such_option: 1\n", "no_such_option"),
        ("log_level: chatty\n", "log_level"),
    ],
)
def test_bad_file_values_name_the_field(tmp_path: Path, content: str, field: str) -> None:
    file = tmp_path / "strobe.yaml"
    file.write_text(content)
    with pytest.raises(ConfigError, match=field):
        config_for(["run", "--config", str(file)])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("frequency: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_for(["run", "--config", str(bad)])
    with pytest.raises(ConfigError, match="cannot read"):
        config_for(["run", "--config", str(tmp_path / "missing.yaml")])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config_for(["run", "--config", str(listy)])


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--frequency"):
        config_for(["run", "--frequency", "100000"])


def test_units() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration(7) == 7.0
    assert parse_duration("2d") == 172800.0
    assert parse_size("1GiB") == 1024**3
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("0")
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_every_run_option_has_a_documented_flag() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run_help = subparsers.choices["run"].format_help()
    from agent.config import OPTIONS

    for option in OPTIONS:
        if option.flag and "run" in option.commands:
            assert "--" + option.name.replace("_", "-") in run_help
            assert option.help.split(".")[0][:20] in run_help.replace("\n", " ").replace("  ", " ")


def test_relabel_configs_come_from_the_file_and_errors_name_the_rule(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "relabel_configs:\n"
        "  - source_labels: [__meta_process_comm]\n"
        "    target_label: program\n"
        "max_series_per_window: 50\n"
    )
    config = config_for(["run", "--config", str(good)])
    assert len(config.relabel_configs) == 1
    assert config.max_series_per_window == 50
    bad = tmp_path / "bad.yaml"
    bad.write_text("relabel_configs:\n  - action: explode\n")
    with pytest.raises(ConfigError, match=r"relabel_configs\[0\]\.action"):
        config_for(["run", "--config", str(bad)])


def test_kubeconfig_and_series_cap_flags() -> None:
    config = config_for(["run", "--kubeconfig", "/etc/kube.conf", "--max-series-per-window", "7"])
    assert config.kubeconfig == "/etc/kube.conf"
    assert config.max_series_per_window == 7
    assert config_for(["run"]).relabel_configs is None  # the default rules apply


def test_no_local_store_needs_a_remote_store() -> None:
    with pytest.raises(ConfigError, match="no_local_store"):
        config_for(["run", "--no-local-store"])
    config = config_for(["run", "--no-local-store", "--remote-store-address", "b:1"])
    assert config.no_local_store


def test_pull_and_token_flags() -> None:
    config = config_for(["run", "--max-profile-seconds", "2m", "--http-token-file", "/t"])
    assert config.max_profile_seconds == 120.0
    assert config.http_token_file == "/t"


@pytest.mark.parametrize(
    ("flag", "too_small", "too_large", "fine"),
    [
        ("--window", "1ms", "2h", "30s"),
        ("--local-store-max-age", "10s", "4000d", "7d"),
        ("--max-profile-seconds", "0.5s", "2h", "1m"),
        ("--remote-store-timeout", "1ms", "1h", "10s"),
        ("--local-store-max-bytes", "1KiB", "2048TiB", "1GiB"),
        ("--remote-store-max-message-bytes", "1KiB", "4GiB", "16MiB"),
        ("--remote-store-queue-max-bytes", "1KiB", "100GiB", "64MiB"),
        ("--remote-store-spool-max-bytes", "1KiB", "2048TiB", "1GiB"),
        ("--symbol-cache-max-bytes", "1KiB", "2048TiB", "1GiB"),
    ],
)
def test_every_duration_and_size_has_bounds_and_names_the_flag(
    flag: str, too_small: str, too_large: str, fine: str
) -> None:
    for value in (too_small, too_large):
        with pytest.raises(ConfigError, match=f"flag {flag}: .*must be between"):
            config_for(["run", flag, value])
    field = flag.removeprefix("--").replace("-", "_")
    assert getattr(config_for(["run", flag, fine]), field) > 0


@pytest.mark.parametrize(
    ("address", "listening", "expected"),
    [
        ("127.0.0.1:7071", False, ("127.0.0.1", 7071)),
        ("parca.example.com:7070", False, ("parca.example.com", 7070)),
        ("[::1]:7070", False, ("::1", 7070)),
        ("[fe80::1%eth0]:7070", False, ("fe80::1%eth0", 7070)),
        ("127.0.0.1:0", True, ("127.0.0.1", 0)),
        ("0.0.0.0:65535", True, ("0.0.0.0", 65535)),
    ],
)
def test_host_port_accepted(address: str, listening: bool, expected: tuple[str, int]) -> None:
    assert split_host_port(address, listening=listening) == expected


@pytest.mark.parametrize(
    ("address", "listening", "reason"),
    [
        ("no-port", False, "is not HOST:PORT"),
        (":7070", False, "is not HOST:PORT"),
        ("host:", False, "is not HOST:PORT"),
        ("host:http", False, "is not HOST:PORT"),
        ("host:+80", False, "is not HOST:PORT"),
        ("host:٨٠", False, "is not HOST:PORT"),  # non-ASCII digits
        ("::1:7070", False, "in brackets"),
        ("[::1:7070", False, "in brackets"),
        ("[example.com]:7070", False, "not an IPv6 address"),
        ("my host:7070", False, "whitespace"),
        ("host:99999", True, "port out of range"),
        ("host:0", False, r"port out of range \(1-65535\)"),
    ],
)
def test_host_port_refused(address: str, listening: bool, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        split_host_port(address, listening=listening)


def test_bad_http_address_names_the_field() -> None:
    with pytest.raises(ConfigError, match="flag --http-address: .*is not HOST:PORT"):
        config_for(["run", "--http-address", "::1:7071"])
    assert config_for(["run", "--http-address", "[::1]:0"]).http_address == "[::1]:0"


def test_every_option_is_a_typed_config_field_and_every_field_an_option() -> None:
    """Config declares a field per option of OPTIONS, in its order, of the type the
    option's parser returns (Optional when the default is None), with its default."""
    hints = typing.get_type_hints(Config)
    fields = [f for f in dataclasses.fields(Config) if f.name != "sources"]
    assert [f.name for f in fields] == [option.name for option in OPTIONS]
    for option, field in zip(OPTIONS, fields, strict=True):
        parsed = typing.get_type_hints(option.parse)["return"]
        expected = parsed | None if option.default is None else parsed
        assert hints[option.name] == expected, option.name
        assert field.default == option.default, option.name
        if option.default is not None:  # the default is a value the parser could return
            origin = typing.get_origin(parsed) or parsed
            assert isinstance(option.default, origin), option.name
    assert Config().values == {option.name: option.default for option in OPTIONS}


def test_a_misspelled_config_field_is_a_type_error(tmp_path: Path) -> None:
    """No __getattr__ fallback: mypy refuses a field Config does not have."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from agent.config import Config\n"
        "def hz(config: Config) -> int:\n"
        "    return config.frequncy\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--config-file",
            "/dev/null",
            "--ignore-missing-imports",
            "--follow-imports=silent",
            str(probe),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert '"Config" has no attribute "frequncy"' in result.stdout, result.stdout
