"""The agent's symbolizer from its configuration: cache directory, bound, debuginfod."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.config import Config, add_arguments, build_config
from agent.model import ProcessInfo
from agent.symbolize.symbolizer import Symbolizer
from tests.symbolize.helpers import loader_mappings


def parsed(*argv: str, environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser, "run")
    return build_config(parser.parse_args(list(argv)), "run", environ or {})


def test_options_parse() -> None:
    config = parsed(
        "--debuginfod-urls", "http://a:8002 https://b/", "--symbol-cache-max-bytes", "64MiB"
    )
    assert config.debuginfod_urls == ("http://a:8002", "https://b")
    assert config.symbol_cache_max_bytes == 64 << 20
    defaults = parsed()
    assert defaults.debuginfod_urls == () and defaults.symbol_cache_max_bytes == 1 << 30


def test_indexes_go_under_cache_dir(c_binaries: Path, tmp_path: Path) -> None:
    config = parsed("--cache-dir", str(tmp_path), "--debuginfod-urls", "http://127.0.0.1:9")
    symbolizer = Symbolizer.from_config(config)
    process = ProcessInfo(0, 0, "t", "", loader_mappings(c_binaries / "spin_pie", 0x7F0000000000))
    assert symbolizer.prepare(process) == 1
    assert list((tmp_path / "symbols").glob("*.symcache"))
    assert symbolizer._debuginfod is not None
    assert symbolizer._debuginfod.cache_dir == tmp_path / "debuginfod"
    symbolizer.close()


def test_debuginfod_urls_fall_back_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEBUGINFOD_URLS", "http://127.0.0.1:9/")
    symbolizer = Symbolizer.from_config(parsed("--cache-dir", str(tmp_path)))
    assert symbolizer._debuginfod is not None and symbolizer._debuginfod.urls == (
        "http://127.0.0.1:9",
    )
    symbolizer.close()
    monkeypatch.delenv("DEBUGINFOD_URLS")
    assert Symbolizer.from_config(parsed("--cache-dir", str(tmp_path)))._debuginfod is None


def test_unusable_cache_dir_falls_back_to_a_private_one(c_binaries: Path, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    symbolizer = Symbolizer.from_config(parsed("--cache-dir", str(not_a_directory)))
    process = ProcessInfo(0, 0, "t", "", loader_mappings(c_binaries / "spin_pie", 0x7F0000000000))
    assert symbolizer.prepare(process) == 1  # still indexes, in a temporary directory
    symbolizer.close()
