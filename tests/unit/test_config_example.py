"""docs/strobe.example.yaml: the agent's own loader reads it, as is and with every optional
`#key: value` line uncommented, and it mentions every option."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from agent.config import OPTION_BY_NAME, Config, build_config, load_file
from agent.labels import DEFAULT_RELABEL_CONFIGS
from tests.conftest import REPO

EXAMPLE = REPO / "docs" / "strobe.example.yaml"
# An optional setting: `#` directly followed by a key (prose comments have "# ").
OPTIONAL_SETTING = re.compile(r"^#(?=[a-z_]+:)", re.MULTILINE)


def run_config(path: Path) -> Config:
    """What `strobe run --config PATH` makes of the file (no flags, no STROBE_* variables)."""
    return build_config(argparse.Namespace(config=path), "run", environ={})


def uncommented(tmp_path: Path) -> Path:
    path = tmp_path / "strobe.yaml"
    path.write_text(OPTIONAL_SETTING.sub("", EXAMPLE.read_text()))
    return path


def test_the_example_loads_as_is() -> None:
    assert load_file(EXAMPLE)  # a mapping of known options with valid values
    config = run_config(EXAMPLE)
    assert config.sources["window"] == "file" and config.window == 10.0
    assert config.local_store == "/var/lib/strobe/profiles"
    assert config.local_store_max_bytes == 1 << 30
    assert config.local_store_max_age == 7 * 86400.0
    assert config.http_address == "127.0.0.1:7071"
    assert not config.remote_store_address  # safe to install as is: nothing is shipped
    # The first rules are the defaults; the example adds an `app` label.
    rules = list(config.relabel_configs)
    assert rules[: len(DEFAULT_RELABEL_CONFIGS)] == list(DEFAULT_RELABEL_CONFIGS)
    (extra,) = rules[len(DEFAULT_RELABEL_CONFIGS) :]
    assert (extra.source_labels, extra.target_label) == (
        ("__meta_kubernetes_pod_label_app",),
        "app",
    )


def test_the_optional_settings_load_when_uncommented(tmp_path: Path) -> None:
    path = uncommented(tmp_path)
    keys = re.findall(r"^([a-z_]+):", path.read_text(), re.MULTILINE)
    assert len(keys) == len(set(keys)), "each option once (YAML would keep the last silently)"
    config = run_config(path)
    assert config.sources["remote_store_address"] == "file"
    assert config.remote_store_address == "parca.example.com:7070"
    assert config.remote_store_protocol == "otlp"
    assert config.remote_store_headers == (("x-scope-orgid", "tenant-a"),)
    assert config.remote_store_spool_max_bytes == 256 << 20
    assert config.no_local_store is True
    assert config.http_token_file == "/etc/strobe/http-token"
    assert config.debuginfod_urls == (
        "https://debuginfod.debian.net",
        "https://debuginfod.elfutils.org",
    )


def test_the_example_mentions_every_option() -> None:
    mentioned = set(re.findall(r"^#?([a-z_]+):", EXAMPLE.read_text(), re.MULTILINE))
    assert mentioned == set(OPTION_BY_NAME)
