"""Find kernel headers bcc can compile the sampler against.

bcc compiles BPF C at run time and needs a kernel header tree. The running kernel's
own headers are best (/lib/modules/$(uname -r)/build). Hosts often lack them (custom
or cloud kernels); then the newest installed distro headers package of the same
architecture will do, because the sampler uses only stable uapi types (the perf_event
context, stack ids, helpers) whose layout does not change between kernel versions.

Debian splits a headers version into two directories, linux-headers-<ver>-<arch>
(config, generated headers) and linux-headers-<ver>-common (the sources). bcc wants
one tree, so we merge them into a tree of symlinks in a cache directory and point
bcc at it with BCC_KERNEL_SOURCE. Every function takes `root` so tests run on fake
trees.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# uname -m -> the architecture suffix of Debian's linux-headers packages.
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "686", "ppc64le": "powerpc64le"}

DEFAULT_CACHE_DIR = "/var/cache/strobe"
FIX_HINT = (
    "install the distribution's kernel headers (Debian: `apt-get install linux-headers-amd64`), "
    "or, in a container, mount the host's /lib/modules and /usr/src read-only"
)


class KernelHeadersError(RuntimeError):
    """No usable kernel headers: the message says what was looked for and the fix."""


@dataclass(frozen=True)
class HeaderChoice:
    """The header tree bcc should use.

    `path` is what BCC_KERNEL_SOURCE must point to, or None when bcc finds the running
    kernel's headers by itself (/lib/modules/$(uname -r)/build and /source).
    """

    path: Path | None
    source: str  # where the headers come from, for the log
    reason: str  # why this choice is safe

    def bcc_environment(self) -> dict[str, str]:
        """Environment variables bcc needs to compile against this choice."""
        return {} if self.path is None else {"BCC_KERNEL_SOURCE": str(self.path)}


@dataclass(frozen=True)
class _DistroHeaders:
    version: str  # e.g. "6.1.0-57"
    arch_dir: Path  # linux-headers-<ver>-<arch>
    common_dir: Path  # linux-headers-<ver>-common


def find_kernel_headers(
    root: Path = Path("/"),
    release: str | None = None,
    machine: str | None = None,
    cache_dir: Path | None = None,
) -> HeaderChoice:
    """Choose kernel headers for bcc; log the choice; raise KernelHeadersError if none."""
    release = release or platform.release()
    machine = machine or platform.machine()
    choice = running_kernel_headers(root, release)
    if choice is None:
        distro = newest_distro_headers(root, machine)
        if distro is None:
            raise KernelHeadersError(_missing_message(root, release, machine))
        tree = merge_header_tree(distro, cache_dir or default_cache_dir(root))
        choice = HeaderChoice(
            path=tree,
            source=f"{distro.arch_dir} + {distro.common_dir} (merged at {tree})",
            reason=(
                f"no headers for the running kernel {release}; the sampler uses only stable "
                f"uapi types, so the distro headers {distro.version} compile it correctly"
            ),
        )
    log.info("kernel headers: using %s; %s", choice.source, choice.reason)
    return choice


def running_kernel_headers(root: Path, release: str) -> HeaderChoice | None:
    """The running kernel's own headers, if /lib/modules/<release>/build has them."""
    modules = root / "lib" / "modules" / release
    build = modules / "build"
    if not (build / "include").is_dir():
        return None
    extra = " + source" if (modules / "source").is_dir() else ""
    return HeaderChoice(
        path=None,  # bcc looks there itself, and combines build/ with source/
        source=f"{build}{extra}",
        reason="headers of the running kernel",
    )


def newest_distro_headers(root: Path, machine: str) -> _DistroHeaders | None:
    """The newest complete linux-headers-<ver>-<arch> + -common pair under /usr/src."""
    usr_src = root / "usr" / "src"
    arch = DEBIAN_ARCH.get(machine, machine)
    # linux-headers-6.1.0-57-amd64, -6.1.0-57-cloud-amd64, -6.10.11+bpo-amd64, ...
    pattern = re.compile(rf"linux-headers-(\d[^/]*?)-{re.escape(arch)}")
    found = []
    try:
        names = sorted(os.listdir(usr_src))
    except OSError:
        return None
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        version, flavour = _split_flavour(match.group(1))
        arch_dir = usr_src / name
        for common in _common_names(version, flavour):
            if _is_complete(arch_dir, usr_src / common):
                found.append(_DistroHeaders(version, arch_dir, usr_src / common))
                break
    # Newest version; among equal versions the plain flavour (shortest name).
    return max(found, key=lambda d: (version_key(d.version), -len(d.arch_dir.name)), default=None)


def _split_flavour(version: str) -> tuple[str, str]:
    """Split a flavour off: 6.1.0-57-cloud -> (6.1.0-57, cloud); 6.1.0-57 -> (6.1.0-57, "")."""
    flavoured = re.fullmatch(r"(.*\d[^-]*)-([a-z]+)", version)
    return (flavoured.group(1), flavoured.group(2)) if flavoured else (version, "")


def _common_names(version: str, flavour: str) -> list[str]:
    """Names of the -common package that goes with linux-headers-<version>[-flavour]-<arch>."""
    names = [f"linux-headers-{version}-common-{flavour}"] if flavour else []
    return [*names, f"linux-headers-{version}-common"]


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sort key for versions like 6.1.0-57 (numbers compare as numbers)."""
    parts = re.findall(r"\d+|[^\d.\-+~]+", version)
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in parts)


def _is_complete(arch_dir: Path, common_dir: Path) -> bool:
    return (arch_dir / "include").is_dir() and (
        common_dir / "include" / "linux" / "kconfig.h"
    ).is_file()


def default_cache_dir(root: Path = Path("/")) -> Path:
    """$STROBE_CACHE_DIR, else /var/cache/strobe, else a temp dir when that is not writable."""
    configured = os.environ.get("STROBE_CACHE_DIR")
    candidate = Path(configured) if configured else root / DEFAULT_CACHE_DIR.lstrip("/")
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    # A fresh private dir: a fixed name in /tmp could be planted by another user.
    fallback = Path(tempfile.mkdtemp(prefix="strobe-cache-"))
    log.warning("cache dir %s is not writable; using %s", candidate, fallback)
    return fallback


def merge_header_tree(distro: _DistroHeaders, cache_dir: Path) -> Path:
    """A tree of symlinks: the -common dir with the -<arch> dir laid over it.

    Rebuilt when the recorded sources differ; built beside and renamed in, so a
    reader never sees a half-made tree.
    """
    base = cache_dir / "kernel-headers"
    target = base / distro.arch_dir.name
    stamp = f"{distro.common_dir}\n{distro.arch_dir}\n"
    if _read_stamp(target) == stamp:
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=base))
    _link_merged(staging, [distro.common_dir, distro.arch_dir])
    (staging / ".strobe-sources").write_text(stamp)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another agent renamed its copy in first: use that one
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _read_stamp(tree: Path) -> str | None:
    try:
        return (tree / ".strobe-sources").read_text()
    except OSError:
        return None


def _link_merged(dest: Path, sources: list[Path]) -> None:
    """Fill `dest` so each name links to the last source that has it; dirs that
    several sources share are merged recursively (so later sources win per file)."""
    entries: dict[str, list[Path]] = {}
    for source in sources:
        for name in sorted(os.listdir(source)):
            entries.setdefault(name, []).append(source / name)
    for name, paths in entries.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1 and len(dirs) == len(paths):
            (dest / name).mkdir()
            _link_merged(dest / name, dirs)
        else:
            (dest / name).symlink_to(paths[-1])


def _missing_message(root: Path, release: str, machine: str) -> str:
    arch = DEBIAN_ARCH.get(machine, machine)
    build = root / "lib" / "modules" / release / "build"
    usr_src = root / "usr" / "src"
    return (
        f"no kernel headers for kernel {release} ({machine}): {build} does not exist and "
        f"{usr_src} has no linux-headers-<version>-{arch} with its -common package. "
        f"Fix: {FIX_HINT}."
    )
