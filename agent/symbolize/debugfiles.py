"""Find a binary's separate debug file, the way gdb does.

1. By build id: <debug dir>/.build-id/<first 2 hex>/<rest>.debug (build id verified).
2. By .gnu_debuglink (name + CRC32), in gdb's order: the binary's directory, its
   .debug/ subdirectory, then <debug dir>/<binary's directory>/ (CRC verified).
Each search runs inside every given root: a container's /proc/PID/root, then the host.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from agent.elf.reader import DebugLink, read_build_id

DEFAULT_DEBUG_DIRS = ("/usr/lib/debug",)
_CHUNK = 1 << 20


def build_id_path(debug_dir: Path, build_id: str) -> Path:
    """Where a debug directory keeps the file for build_id."""
    return debug_dir / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes, as .gnu_debuglink records it."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def in_root(root: Path, path: str | Path) -> Path:
    """An absolute path as seen inside root (e.g. /proc/PID/root)."""
    return root / str(path).lstrip("/")


def find_by_build_id(
    build_id: str, roots: Sequence[Path], debug_dirs: Sequence[str]
) -> Path | None:
    if len(build_id) < 3:
        return None
    for root in roots:
        for debug_dir in debug_dirs:
            candidate = build_id_path(in_root(root, debug_dir), build_id)
            if candidate.is_file() and read_build_id(str(candidate)) == build_id:
                return candidate
    return None


def debuglink_candidates(
    binary_path: str, link: DebugLink, root: Path, debug_dirs: Sequence[str]
) -> list[Path]:
    """gdb's search order for a debuglink name, inside one root."""
    directory = os.path.dirname(binary_path) or "/"
    candidates = [
        in_root(root, os.path.join(directory, link.name)),
        in_root(root, os.path.join(directory, ".debug", link.name)),
    ]
    for debug_dir in debug_dirs:
        candidates.append(in_root(root, debug_dir) / directory.lstrip("/") / link.name)
    return candidates


def find_by_debuglink(
    binary_path: str,
    link: DebugLink,
    roots: Sequence[Path],
    debug_dirs: Sequence[str],
    binary_file: Path | None = None,
) -> Path | None:
    """The first candidate whose CRC32 matches; never the binary itself."""
    for root in roots:
        for candidate in debuglink_candidates(binary_path, link, root, debug_dirs):
            try:
                if not candidate.is_file():
                    continue
                if binary_file is not None and os.path.samefile(candidate, binary_file):
                    continue
                if file_crc32(candidate) == link.crc:
                    return candidate
            except OSError:
                continue
    return None


def find_debug_file(
    binary_path: str,
    build_id: str,
    debuglink: DebugLink | None,
    roots: Sequence[Path] = (Path("/"),),
    debug_dirs: Sequence[str] = DEFAULT_DEBUG_DIRS,
    binary_file: Path | None = None,
) -> Path | None:
    """The separate debug file for a binary, or None.

    binary_path is the binary's path as its process sees it (for debuglink
    directories); binary_file, the path we opened it by (to skip the binary itself).
    """
    found = find_by_build_id(build_id, roots, debug_dirs) if build_id else None
    if found is None and debuglink is not None:
        found = find_by_debuglink(binary_path, debuglink, roots, debug_dirs, binary_file)
    return found
