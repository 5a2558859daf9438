"""A configuration that blocks on reading (a FIFO) costs the window loop at most the
timeout, and the reload is refused with one line; a normal load passes through."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent.commands.reload import load_with_timeout
from agent.config import Config, ConfigError, load_file


def test_a_fifo_config_times_out_instead_of_stalling(tmp_path: Path) -> None:
    fifo = tmp_path / "strobe.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="took over 0.5 s"):
        load_with_timeout(lambda: Config().with_values(**load_file(fifo)), 0.5)
    assert time.monotonic() - started < 2
    # Unblock the reader left behind so the test leaves no thread waiting forever.
    with open(fifo, "w") as writer:
        writer.write("window: 5s\n")
    deadline = time.monotonic() + 5
    while any(t.name == "config-reload" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_normal_load_and_its_errors_pass_through(tmp_path: Path) -> None:
    assert load_with_timeout(lambda: Config().with_values(window=5.0), 5).window == 5.0

    def bad() -> Config:
        raise ConfigError("window: must be between 1s and 1h")

    with pytest.raises(ConfigError, match="between"):
        load_with_timeout(bad, 5)
