"""Kernel header selection over fake directory trees (no root, no bcc)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sampler.kernel_headers import (
    KernelHeadersError,
    default_cache_dir,
    find_kernel_headers,
    newest_distro_headers,
    version_key,
)

RELEASE = "6.18.44-custom"


def make_distro_headers(root: Path, version: str, arch: str = "amd64") -> tuple[Path, Path]:
    """A minimal Debian-style pair: -<arch> (config, generated) and -common (sources)."""
    src = root / "usr" / "src"
    arch_dir = src / f"linux-headers-{version}-{arch}"
    common = src / f"linux-headers-{version}-common"
    for path in (
        arch_dir / "include" / "generated" / "autoconf.h",
        arch_dir / "include" / "config" / "auto.conf",
        arch_dir / "arch" / "x86" / "include" / "generated" / "asm" / "cpufeatures.h",
        common / "include" / "linux" / "kconfig.h",
        common / "include" / "linux" / "sched.h",
        common / "arch" / "x86" / "include" / "asm" / "ptrace.h",
        common / "Makefile",
        arch_dir / "Makefile",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{path.relative_to(src)}\n")
    return arch_dir, common


def test_running_kernel_headers_win(tmp_path: Path) -> None:
    build = tmp_path / "lib" / "modules" / RELEASE / "build"
    (build / "include").mkdir(parents=True)
    make_distro_headers(tmp_path, "6.1.0-57")

    choice = find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache")

    assert choice.path is None  # bcc finds /lib/modules/<release>/build itself
    assert choice.bcc_environment() == {}
    assert str(build) in choice.source
    assert not (tmp_path / "cache" / "kernel-headers").exists()


def test_distro_headers_merged_common_first_arch_over_it(tmp_path: Path) -> None:
    arch_dir, common = make_distro_headers(tmp_path, "6.1.0-57")
    # A file both packages have: the arch one must win.
    (common / "include" / "generated").mkdir(parents=True)
    (common / "include" / "generated" / "autoconf.h").write_text("common\n")

    choice = find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache")

    tree = choice.path
    assert tree is not None and tree.parent == tmp_path / "cache" / "kernel-headers"
    assert choice.bcc_environment() == {"BCC_KERNEL_SOURCE": str(tree)}
    assert (tree / "include" / "linux" / "kconfig.h").read_text().startswith(common.name)
    autoconf = tree / "include" / "generated" / "autoconf.h"
    assert autoconf.read_text().startswith(arch_dir.name)
    assert autoconf.is_symlink()
    assert (tree / "arch" / "x86" / "include" / "asm" / "ptrace.h").is_file()
    assert (tree / "arch" / "x86" / "include" / "generated" / "asm" / "cpufeatures.h").is_file()
    assert (tree / "Makefile").resolve() == (arch_dir / "Makefile").resolve()
    assert "uapi" in choice.reason and RELEASE in choice.reason


def test_merged_tree_is_reused_and_rebuilt_when_sources_change(tmp_path: Path) -> None:
    make_distro_headers(tmp_path, "6.1.0-57")
    first = find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache").path
    assert first is not None
    marker = first / "marker"
    marker.write_text("x")
    again = find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache").path
    assert again == first and marker.exists()  # same sources: reused

    (first / ".strobe-sources").write_text("something else\n")
    rebuilt = find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache").path
    assert rebuilt == first and not marker.exists()
    assert (rebuilt / "include" / "linux" / "kconfig.h").is_file()


def test_newest_version_wins(tmp_path: Path) -> None:
    make_distro_headers(tmp_path, "6.1.0-9")
    make_distro_headers(tmp_path, "6.1.0-57")
    make_distro_headers(tmp_path, "5.10.0-30")

    found = newest_distro_headers(tmp_path, "x86_64")

    assert found is not None and found.version == "6.1.0-57"
    assert found.common_dir.name == "linux-headers-6.1.0-57-common"


def test_plain_flavour_preferred_over_cloud_of_same_version(tmp_path: Path) -> None:
    make_distro_headers(tmp_path, "6.1.0-57-cloud")  # common: linux-headers-6.1.0-57-cloud-common
    cloud_common = tmp_path / "usr" / "src" / "linux-headers-6.1.0-57-cloud-common"
    cloud_common.rename(tmp_path / "usr" / "src" / "linux-headers-6.1.0-57-common")
    found = newest_distro_headers(tmp_path, "x86_64")
    assert found is not None and found.arch_dir.name == "linux-headers-6.1.0-57-cloud-amd64"

    make_distro_headers(tmp_path, "6.1.0-57")
    found = newest_distro_headers(tmp_path, "x86_64")
    assert found is not None and found.arch_dir.name == "linux-headers-6.1.0-57-amd64"


def test_other_architecture_and_incomplete_pairs_are_ignored(tmp_path: Path) -> None:
    make_distro_headers(tmp_path, "6.2.0-1", arch="arm64")
    arch_only, common = make_distro_headers(tmp_path, "6.3.0-1")
    (common / "include" / "linux" / "kconfig.h").unlink()  # -common incomplete

    assert newest_distro_headers(tmp_path, "x86_64") is None
    assert newest_distro_headers(tmp_path, "aarch64") is not None


def test_no_headers_raises_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "usr" / "src").mkdir(parents=True)
    with pytest.raises(KernelHeadersError) as caught:
        find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache")
    message = str(caught.value)
    assert RELEASE in message
    assert "apt-get install linux-headers-amd64" in message
    assert "/lib/modules" in message and "/usr/src" in message


def test_missing_usr_src_is_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(KernelHeadersError):
        find_kernel_headers(tmp_path, RELEASE, "x86_64", tmp_path / "cache")


def test_version_key_orders_numerically() -> None:
    versions = ["6.1.0-9", "6.10.0-1", "6.1.0-57", "5.19.0-100", "6.10.11+bpo"]
    assert sorted(versions, key=version_key) == [
        "5.19.0-100",
        "6.1.0-9",
        "6.1.0-57",
        "6.10.0-1",
        "6.10.11+bpo",
    ]


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROBE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir(tmp_path) == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir()


def test_unwritable_cache_dir_falls_back_to_private_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("STROBE_CACHE_DIR", str(blocker / "cache"))  # parent is a file
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    chosen = default_cache_dir(tmp_path)
    assert chosen.parent == tmp_path / "tmp"
    assert chosen.is_dir() and os.access(chosen, os.W_OK)
    assert (chosen.stat().st_mode & 0o777) == 0o700
