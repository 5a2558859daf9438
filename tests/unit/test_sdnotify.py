"""agent.util.sdnotify against real AF_UNIX datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.util.sdnotify import READY, WATCHDOG, notify, socket_address


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"strobe-test-notify-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(10)
    yield sock, "@" + name
    sock.close()


def test_notify_sends_the_state_to_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    assert notify(READY, {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, value = abstract_socket
    assert notify(f"{WATCHDOG}\nSTATUS=sampling", {"NOTIFY_SOCKET": value}) is True
    assert sock.recv(4096) == b"WATCHDOG=1\nSTATUS=sampling"


def test_notify_reads_the_process_environment(
    path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify(READY) is True
    assert sock.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_a_no_op() -> None:
    assert notify(READY, {}) is False
    assert notify(READY, {"NOTIFY_SOCKET": ""}) is False


def test_notify_to_a_missing_socket_reports_failure_without_raising(tmp_path: Path) -> None:
    assert notify(READY, {"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False
    assert notify(READY, {"NOTIFY_SOCKET": "@strobe-test-nobody-listens-here"}) is False


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == "\0abc"
    assert socket_address("@") is None
    assert socket_address("relative/path") is None
    assert socket_address("vsock:2:1234") is None
