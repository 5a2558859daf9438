"""The admin HTTP bearer token: the configured --http-token-file, else one generated once.

Profiles served by /debug/pprof/* hold every process's stacks, pids, comms and paths, so they
always need a token, also on loopback. With no --http-token-file the agent generates one at
first start as GENERATED_NAME under the cache dir (mode 0600, owned by the agent's user) and
reuses it later, so root, who can read the file, can pull and other local users cannot.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config, ConfigError

GENERATED_NAME = "admin-token"
FIELD = "http_token_file"


@dataclass(frozen=True)
class AdminToken:
    value: str
    path: Path
    generated: bool  # True: made by the agent, so only /debug/pprof/* requires it


def admin_token(config: Config) -> AdminToken:
    if config.http_token_file:
        path = Path(config.http_token_file)
        return AdminToken(read_token_file(path), path, generated=False)
    path = Path(config.cache_dir) / GENERATED_NAME
    return AdminToken(generated_token(path), path, generated=True)


def read_token_file(path: Path) -> str:
    """The stripped token in `path`; anything unusable is a one-line ConfigError naming it."""
    try:
        token = path.read_bytes().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{FIELD}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{FIELD}: {path} is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"{FIELD}: {path} is empty")
    return token


def generated_token(path: Path) -> str:
    """The token in `path`, created first if missing; refuses a file others could know."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create(path)
    except FileExistsError:
        pass  # made by an earlier start (or a concurrent one): reuse it
    except OSError as exc:
        raise ConfigError(
            f"cache_dir: cannot create the admin token {path}: {exc.strerror}"
        ) from None
    _check_private(path)
    return read_token_file(path)


def _create(path: Path) -> None:
    """Write a fresh token to a private temporary file, then link it into place: readers never
    see a partial file, and an existing token (or anything planted there) is never replaced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed start that had our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_private(path: Path) -> None:
    """Only a regular file of ours that nobody else can read (or have planted) is a secret."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"{FIELD}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{FIELD}: {path} is not a regular file; remove it")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{FIELD}: {path} must be owned by uid {os.geteuid()} with mode 0600 "
            f"(is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}); remove it"
        )
