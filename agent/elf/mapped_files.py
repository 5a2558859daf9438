"""Open a mapped file as its process sees it, and make sure it is the mapped file.

A path in /proc/PID/maps is relative to the process's mount namespace, and the file
there may have been replaced (package upgrade) or deleted since it was mapped. So a
candidate path is trusted only when its dev + inode match the mapping's:
    1. /proc/PID/root/<path>              the process's own filesystem view
    2. /proc/PID/map_files/<start>-<end>  the mapped file itself (deleted or replaced)
    3. <path> on the host                 a process that exited since it was captured
(For a process in the host's mount namespace, 1 and 3 are the same path, tried first.)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from agent.model import Mapping

PROC = Path("/proc")
VDSO = "[vdso]"


@dataclass(frozen=True)
class OpenedBinary:
    """A file we verified to be a mapping's file."""

    path: str  # where we can open it now
    root: Path  # the filesystem root of the process that maps it ("/" for the host)
    dev: int
    inode: int
    mtime_ns: int
    size: int

    @property
    def file_key(self) -> str:
        """Cache identity for files without a build id."""
        return f"file:{self.dev}:{self.inode}:{self.mtime_ns}:{self.size}"


def parse_dev(dev: str) -> tuple[int, int] | None:
    """maps' "major:minor" (hex) -> (major, minor)."""
    major, colon, minor = dev.partition(":")
    try:
        return (int(major, 16), int(minor, 16)) if colon else None
    except ValueError:
        return None


def identity_matches(st: os.stat_result, mapping: Mapping, strict_dev: bool = True) -> bool:
    """The stat'ed file is the mapped file (same inode, and same device if strict)."""
    if st.st_ino != mapping.inode:
        return False
    if not strict_dev:
        return True
    return parse_dev(mapping.dev) == (os.major(st.st_dev), os.minor(st.st_dev))


def process_root(pid: int, proc: Path = PROC) -> Path:
    """The process's filesystem root, or the host's when it is the same (or gone).

    Compared by stat, not readlink: a container's root also reads as "/".
    """
    root = proc / str(pid) / "root"
    try:
        theirs, ours = os.stat(root), os.stat("/")
    except OSError:
        return Path("/")
    return Path("/") if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) else root


def candidate_paths(pid: int | None, mapping: Mapping, proc: Path) -> list[tuple[str, Path]]:
    """(path to try, root it belongs to), in order of preference."""
    host = (mapping.path, Path("/"))
    if not pid:
        return [host]
    root = process_root(pid, proc)
    map_file = (str(proc / str(pid) / "map_files" / map_files_name(mapping)), root)
    if root == Path("/"):
        return [host, map_file]
    return [(str(root / mapping.path.lstrip("/")), root), map_file, host]


def map_files_name(mapping: Mapping) -> str:
    return f"{mapping.start:x}-{mapping.end:x}"


def open_mapped_file(pid: int | None, mapping: Mapping, proc: Path = PROC) -> OpenedBinary | None:
    """The verified file of a file-backed mapping, or None when no candidate matches.

    On overlayfs, stat through the container path reports the overlay's device while
    maps reports the underlying one; when map_files is unreadable (no CAP_SYS_ADMIN)
    a same-inode match through the process root is accepted as a last resort.
    """
    if not mapping.path.startswith("/"):
        return None
    candidates = candidate_paths(pid, mapping, proc)
    for strict_dev in (True, False):
        for path, root in candidates:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if identity_matches(st, mapping, strict_dev):
                return OpenedBinary(path, root, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    return None


@functools.lru_cache(maxsize=1)
def own_vdso() -> bytes | None:
    """This process's vDSO image: the same kernel image every 64-bit process maps."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.rstrip().endswith(VDSO)]
        if not lines:
            return None
        start_text, _, end_text = lines[0].split()[0].partition("-")
        start, end = int(start_text, 16), int(end_text, 16)
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            mem.seek(start)
            return mem.read(end - start)
    except (OSError, ValueError):
        return None
