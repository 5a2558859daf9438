"""A debuginfod client: debug files and executables by build id, off the sampling path.

    GET <server>/buildid/<hex build id>/debuginfo    the separate debug file
    GET <server>/buildid/<hex build id>/executable   the binary itself

Servers come from the configuration or, as elfutils reads them, from DEBUGINFOD_URLS
(space-separated). request() never waits: it answers from the disk cache or starts a
download on a small thread pool and calls back when the file has arrived, so frames
resolve in a later window. Each HTTP request has a timeout; a file that could not be
had is remembered for negative_ttl seconds; a downloaded file is kept only when it is
an ELF file with the requested build id.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.elf.reader import read_build_id
from agent.metrics import DEBUGINFOD_BYTES, DEBUGINFOD_CACHE_HITS, DEBUGINFOD_REQUESTS

log = logging.getLogger(__name__)

KINDS = ("debuginfo", "executable")
_BUILD_ID = re.compile(r"^[0-9a-f]{2,128}$")
_CHUNK = 1 << 16
MAX_NEGATIVE_ENTRIES = 65536

Callback = Callable[[Path | None], None]


class Status(enum.Enum):
    READY = "ready"  # the file is on disk: the path comes with it
    PENDING = "pending"  # a download runs; the callback will tell
    UNAVAILABLE = "unavailable"  # no server, a bad id, or a recent failure


def urls_from(
    configured: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The configured servers, else DEBUGINFOD_URLS; only http(s) URLs are used."""
    raw = (
        list(configured)
        or (os.environ if environ is None else environ).get("DEBUGINFOD_URLS", "").split()
    )
    urls = []
    for url in raw:
        if re.match(r"^https?://", url):
            urls.append(url.rstrip("/"))
        else:
            log.warning("debuginfod: ignoring %r (only http:// and https:// are supported)", url)
    return tuple(urls)


class DownloadError(Exception):
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(f"{result}: {detail}")
        self.result = result  # strobe_debuginfod_requests{result}


class DebuginfodClient:
    """Downloads by build id into <cache_dir>/<build id>/<kind>, bounded by max_cache_bytes."""

    def __init__(
        self,
        urls: Sequence[str],
        cache_dir: Path,
        *,
        timeout: float = 15.0,
        max_download_seconds: float = 300.0,
        negative_ttl: float = 600.0,
        max_workers: int = 2,
        max_file_bytes: int = 2 << 30,
        max_cache_bytes: int = 4 << 30,
    ) -> None:
        self.urls = tuple(url.rstrip("/") for url in urls)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.max_download_seconds = max_download_seconds
        self.negative_ttl = negative_ttl
        self.max_file_bytes = max_file_bytes
        self.max_cache_bytes = max_cache_bytes
        self._lock = threading.Lock()
        self._negative: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> retry after
        self._in_flight: dict[tuple[str, str], list[Callback]] = {}
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="strobe-debuginfod")
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def path_of(self, build_id: str, kind: str) -> Path:
        return self.cache_dir / build_id / kind

    def cached(self, build_id: str, kind: str) -> Path | None:
        """The downloaded file, if the disk cache has it (refreshing its LRU place)."""
        path = self.path_of(build_id, kind)
        try:
            os.utime(path)
        except OSError:
            return None
        DEBUGINFOD_CACHE_HITS.inc()
        return path

    def request(self, build_id: str, kind: str, on_done: Callback) -> tuple[Status, Path | None]:
        """The file now (READY), or a download started or joined (PENDING), or UNAVAILABLE.

        on_done(path or None) runs on a download thread, only when PENDING was returned.
        """
        build_id = build_id.lower()
        if not self.urls or kind not in KINDS or not _BUILD_ID.match(build_id):
            return Status.UNAVAILABLE, None
        path = self.cached(build_id, kind)
        if path is not None:
            return Status.READY, path
        key = (build_id, kind)
        with self._lock:
            if self._negative.get(key, 0.0) > time.monotonic():
                return Status.UNAVAILABLE, None
            waiting = self._in_flight.get(key)
            if waiting is not None:
                waiting.append(on_done)
                return Status.PENDING, None
            self._in_flight[key] = [on_done]
        self._pool.submit(self._download_and_notify, build_id, kind)
        return Status.PENDING, None

    def fetch(self, build_id: str, kind: str) -> Path | None:
        """Blocking: the cached file, else try each server in turn; None when none has it."""
        build_id = build_id.lower()
        if kind not in KINDS or not _BUILD_ID.match(build_id):
            return None
        path = self.cached(build_id, kind)
        if path is not None:
            return path
        for url in self.urls:
            try:
                path = self._download(f"{url}/buildid/{build_id}/{kind}", build_id, kind)
            except DownloadError as exc:
                DEBUGINFOD_REQUESTS.labels(result=exc.result).inc()
                log.debug("debuginfod %s %s from %s: %s", build_id, kind, url, exc)
                continue
            DEBUGINFOD_REQUESTS.labels(result="ok").inc()
            self._evict()
            return path
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _download_and_notify(self, build_id: str, kind: str) -> None:
        key = (build_id, kind)
        path: Path | None = None
        try:
            path = self.fetch(build_id, kind)
        except Exception:  # a bug here must still release the waiters
            log.exception("debuginfod download of %s %s failed", build_id, kind)
        with self._lock:
            callbacks = self._in_flight.pop(key, [])
            if path is None:
                self._negative[key] = time.monotonic() + self.negative_ttl
                self._negative.move_to_end(key)
                while len(self._negative) > MAX_NEGATIVE_ENTRIES:
                    self._negative.popitem(last=False)
        for callback in callbacks:
            try:
                callback(path)
            except Exception:
                log.exception("debuginfod callback failed")

    def _download(self, url: str, build_id: str, kind: str) -> Path:
        """One GET into the cache; raises DownloadError (result label) on any failure."""
        target = self.path_of(build_id, kind)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{kind}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            self._get_into(url, temp)
            if read_build_id(str(temp)) != build_id:
                raise DownloadError("invalid", f"{url}: not an ELF file with build id {build_id}")
            os.replace(temp, target)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        return target

    def _get_into(self, url: str, temp: Path) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "strobe-debuginfod/1"})
        deadline = time.monotonic() + self.max_download_seconds
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                length = int(response.headers.get("Content-Length") or 0)
                if length > self.max_file_bytes:
                    raise DownloadError("too_large", f"{url}: {length} bytes")
                self._copy(response, temp, deadline, url)
        except urllib.error.HTTPError as exc:
            raise DownloadError(
                "not_found" if exc.code == 404 else "error", f"{url}: {exc}"
            ) from None
        except urllib.error.URLError as exc:
            timed_out = isinstance(exc.reason, TimeoutError)
            raise DownloadError("timeout" if timed_out else "error", f"{url}: {exc}") from None
        except TimeoutError as exc:
            raise DownloadError("timeout", f"{url}: {exc}") from None
        except (OSError, ValueError) as exc:  # reset connections, malformed responses
            raise DownloadError("error", f"{url}: {type(exc).__name__}: {exc}") from None

    def _copy(self, response: object, temp: Path, deadline: float, url: str) -> None:
        size = 0
        with open(temp, "wb") as out:
            # read1: what has arrived, so a server trickling bytes meets the deadline check.
            while chunk := response.read1(_CHUNK):  # type: ignore[attr-defined]
                size += len(chunk)
                DEBUGINFOD_BYTES.inc(len(chunk))
                if size > self.max_file_bytes:
                    raise DownloadError(
                        "too_large", f"{url}: more than {self.max_file_bytes} bytes"
                    )
                if time.monotonic() > deadline:
                    raise DownloadError(
                        "timeout", f"{url}: slower than {self.max_download_seconds} s"
                    )
                out.write(chunk)

    def _evict(self) -> None:
        """Drop least recently used downloads until the cache fits max_cache_bytes."""
        files = []
        for path in self.cache_dir.glob("*/*"):
            with contextlib.suppress(OSError):
                st = path.stat()
                if path.name in KINDS:
                    files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_cache_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only when empty
