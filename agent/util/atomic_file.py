"""Write a file whole or not at all, and durably: the one atomic-write helper.

    write_atomically(path, data)   # readers see the old file or all of `data`, never part

The data goes to a temporary file beside `path` (a hidden `.tmp-<pid>-<name>` unless the
caller names another), which is fsynced, renamed over `path`, and then the directory is
fsynced, so after a crash or power loss both the data and its name are there.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_PREFIX = ".tmp-"  # the default temporary's prefix: a reader skips or removes such files


def write_atomically(path: Path, data: bytes, temporary: Path | None = None) -> None:
    """Replace `path` by `data` (write, fsync, rename, fsync the directory).

    On any failure the temporary is gone and the exception propagates. When only the
    directory fsync fails, `path` is removed too (its name might not survive a power
    loss), so a caller that keeps the data elsewhere on error loses nothing.
    """
    if temporary is None:
        temporary = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # the rename must not outlive the data on a crash
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself must survive a power loss
        finally:
            os.close(directory)
    except OSError:
        path.unlink(missing_ok=True)  # not durable: the caller keeps it elsewhere
        raise
