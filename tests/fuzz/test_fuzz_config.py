"""The config file on arbitrary content: a Config, or a ConfigError that names the file or
the field, never another exception (a traceback instead of a message at startup)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from agent.config import OPTIONS, Config, ConfigError, build_config, load_file
from tests.fuzz import any_text, fuzz_settings

NAMES = [option.name for option in OPTIONS]
KEY = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES).map(lambda name: name.replace("_", "-")),
    st.sampled_from(["config", "unknown", "1", "~", "null", "<<", "? [a]"]),
)
# Scalars and snippets that make YAML loaders and value parsers stumble.
TRICKY_VALUE = st.sampled_from(
    [
        "2001-02-30",  # a timestamp with no such day: ValueError inside yaml
        "!!int abc",
        "!!float x",
        "!!binary '###'",
        "!!python/object/apply:os.system [true]",
        ".nan",
        ".inf",
        "-.inf",
        "1e400",
        "1" + "0" * 400,  # an int no float holds
        "9" * 5000,  # more digits than int() takes from a string
        "0x",
        "0o777",
        "-1",
        "0",
        "~",
        "yes",
        "'",
        '"\\ud800"',  # a lone surrogate, written as a YAML escape
        '"\\x00\\x85"',
        "[" * 3000,
        "[" * 3000 + "]" * 3000,
        "{a: [b, {c: d}]}",
        "&a [*a]",
        "*nowhere",
        "[{regex: 'a{4294967296}'}]",
        "[{regex: '(?i)x', action: keep}]",
        "512MiB",
        "1.5 GiB",
        "10ms",
        "127.0.0.1:99999",
        "a=b,C=d",
    ]
)
VALUE_TEXT = st.one_of(TRICKY_VALUE, any_text.map(json.dumps), any_text)


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    """A config-like YAML document: option lines with odd values, sometimes broken."""
    lines = [f"{draw(KEY)}: {draw(VALUE_TEXT)}" for _ in range(draw(st.integers(0, 4)))]
    if draw(st.booleans()):
        lines.append(draw(any_text))
    return "\n".join(line.replace("\n", " ") for line in lines) + "\n"


def run_config(path: Path) -> Config:
    return build_config(argparse.Namespace(config=path), "run", environ={})


def assert_names_file_or_field(message: str, path: Path) -> None:
    assert message.startswith(f"config file {path}") or any(
        message.startswith(name + ":") for name in NAMES
    ), message


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config") / "strobe.yaml"


@fuzz_settings(200)
@given(yaml_texts())
@example("window: 2001-02-30\n")
@example("window: " + "1" + "0" * 400 + "\n")
@example("window: .nan\n")
@example("[" * 3000)
@example("relabel_configs: [{regex: 'a{4294967296}'}]\n")
def test_config_text_gives_config_or_config_error(config_path: Path, text: str) -> None:
    config_path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        config = run_config(config_path)
    except ConfigError as exc:
        assert_names_file_or_field(str(exc), config_path)
        return
    assert isinstance(config, Config)
    for name in ("window", "local_store_max_age", "max_profile_seconds", "remote_store_timeout"):
        assert 0 < getattr(config, name) < float("inf"), name  # durations are usable


@fuzz_settings(200)
@given(st.binary(max_size=200))
@example(b"\xff\xfe window: 10s\n")
@example(b"window: 10s\n\x80")
def test_config_bytes_give_config_or_config_error(config_path: Path, raw: bytes) -> None:
    config_path.write_bytes(raw)
    try:
        load_file(config_path)
    except ConfigError as exc:
        assert str(exc).startswith(f"config file {config_path}"), str(exc)


@fuzz_settings(200)
@given(st.dictionaries(st.sampled_from(NAMES), st.one_of(st.none(), st.booleans(),
       st.integers(), st.floats(), st.text(max_size=20), st.lists(st.integers(), max_size=2)),
       max_size=6))  # fmt: skip
def test_config_values_of_any_type(config_path: Path, values: dict[str, object]) -> None:
    """Each option given a value of the wrong type fails with that option's name."""
    config_path.write_text(yaml.safe_dump(values))
    try:
        config = run_config(config_path)
    except ConfigError as exc:
        message = str(exc)
        assert_names_file_or_field(message, config_path)
        if message.startswith("config file"):
            assert any(f": {name}:" in message for name in values), message
        return
    assert isinstance(config, Config)
