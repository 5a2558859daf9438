"""write_atomically: whole or nothing, and nothing left behind when it fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.util.atomic_file import TMP_PREFIX, write_atomically


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "profile.pb.gz"
    path.write_bytes(b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["profile.pb.gz"]


def test_a_named_temporary_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, temporary = tmp_path / "1.req", tmp_path / ".1.req.tmp"
    seen: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(str(a)), real_replace(a, b)))
    write_atomically(path, b"data", temporary=temporary)
    assert seen == [str(temporary)] and path.read_bytes() == b"data"


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profile.pb.gz"
    path.write_bytes(b"old")

    def no_space(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_failed_directory_fsync_removes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "1.req"
    real_fsync = os.fsync

    def fail_on_directories(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_on_directories)
    with pytest.raises(OSError):
        write_atomically(path, b"data")
    assert list(tmp_path.iterdir()) == []
