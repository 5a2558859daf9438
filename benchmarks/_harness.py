"""Shared plumbing of the benchmark scripts: the agent as a child process, /proc
accounting, C workloads, metrics scraping and result output.

Not a benchmark itself (run_all.py skips files that start with "_"). Everything here
reads the kernel's own accounting (/proc/PID/stat, /proc/PID/status) so the numbers
need no extra tools.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WORKLOAD_SOURCE = Path(__file__).resolve().parent / "workload.c"


# -- environment ---------------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this benchmark needs root (BPF and perf events): run it with sudo")


def git_commit() -> str:
    """HEAD's short hash, "+dirty" when agent/ or bpf/ have uncommitted changes."""
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "agent", "bpf")
    return head + ("+dirty" if dirty else "")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


_AT_START: dict[str, Any] = {}  # load when the benchmark began (set by base_parser)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 2**20, 1),
        **_AT_START,
    }


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def base_parser(description: str) -> argparse.ArgumentParser:
    _AT_START.update(loadavg_at_start=os.getloadavg(), processes_at_start=len(pids()))
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs (what `make bench` runs); overrides the duration options",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    return parser


def emit(name: str, result: dict[str, Any], json_path: str | None) -> None:
    """Print the result and optionally save it, stamped with commit and machine."""
    document = {
        "benchmark": name,
        "commit": git_commit(),
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "loadavg_at_end": os.getloadavg(),
        "result": result,
    }
    print(json.dumps(_brief(document), indent=2, default=str))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(document, indent=2, default=str) + "\n")


DETAIL_KEYS = {"series", "legs", "windows"}  # long lists: only in the JSON file


def _brief(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items() if k not in DETAIL_KEYS}
    if isinstance(value, list):
        return [_brief(v) for v in value]
    return value


# -- /proc accounting ----------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime (all threads)
    child_ticks: int  # cutime + cstime (waited-for children)
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
    # fields[0] is field 3 (state): field n of proc(5) is fields[n - 3]
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        child_ticks=int(fields[13]) + int(fields[14]),
        rss_bytes=int(fields[21]) * PAGE_SIZE,
    )


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> list[ProcStat]:
    """Live processes below `root` (children, grandchildren...)."""
    stats = [s for s in (read_stat(p) for p in pids()) if s is not None]
    children: dict[int, list[ProcStat]] = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
    found: list[ProcStat] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` (all threads), its reaped children and its live descendants."""
    own = read_stat(pid)
    if own is None:
        return float("nan")
    ticks = own.cpu_ticks + own.child_ticks
    ticks += sum(d.cpu_ticks + d.child_ticks for d in descendants(pid))
    return ticks / CLOCK_TICKS


def status_kib(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, RssAnon...); 0 when absent."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


# -- statistics ----------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "stdev": round(statistics.stdev(ordered), 4) if len(ordered) > 1 else 0.0,
        "n": len(ordered),
    }


# -- C workloads ---------------------------------------------------------------------


def build_workload(workdir: Path) -> Path:
    """Compile benchmarks/workload.c with frame pointers (so every profiler walks it)."""
    binary = workdir / "workload"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-o",
            str(binary),
            str(WORKLOAD_SOURCE),
        ],
        check=True,
    )
    return binary


class Crowd:
    """Many workload processes, started and stopped together."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: Sequence[str],
        count: int,
        nice: int = 0,
        cpu: int | None = None,
        idle: bool = False,
    ) -> None:
        """`idle`: SCHED_IDLE (weight 3, vs 15 at nice 19): a crowd of 1,000 busy
        processes then still leaves the agent and this script most of a CPU."""
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        prefix += ["nice", "-n", str(nice)] if nice else []
        prefix += ["chrt", "--idle", "0"] if idle else []
        for _ in range(count):
            self.procs.append(
                subprocess.Popen(
                    [*prefix, *argv],
                    stdout=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def fork(self, argv: Sequence[str], count: int, idle: bool = False) -> None:
        """`count` copies of a workload that forks itself (`workload MODE SECONDS N`)."""
        prefix = ["chrt", "--idle", "0"] if idle else []
        self.procs.append(
            subprocess.Popen(
                [*prefix, *argv, str(count)],
                stdout=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # stop() kills the whole group
            )
        )

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # each is its own group leader
        for proc in self.procs:
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> Crowd:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# -- the agent -----------------------------------------------------------------------

ADMIN_LINE = re.compile(r"admin HTTP listening on ([\d.]+):(\d+)")


@dataclass
class AgentLog:
    lines: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, line)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, line: str) -> None:
        with self.cond:
            self.lines.append((time.monotonic(), line))
            self.cond.notify_all()

    def wait_for(self, needle: str, timeout: float) -> float | None:
        """Monotonic arrival time of the first line containing `needle`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for when, line in self.lines:
                    if needle in line:
                        return when
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def text(self) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines)


class Agent:
    """`python -m agent run` as a child: admin port from its log, /metrics, /proc numbers."""

    def __init__(
        self,
        workdir: Path,
        frequency: int = 19,
        window: str = "10s",
        extra: Sequence[str] = (),
        cpu: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.argv = [
            *(["taskset", "-c", str(cpu)] if cpu is not None else []),
            str(PYTHON),
            "-m",
            "agent",
            "run",
            "--frequency",
            str(frequency),
            "--window",
            window,
            "--http-address",
            "127.0.0.1:0",
            "--local-store",
            str(workdir / "store"),
            "--cache-dir",
            str(workdir / "cache"),
            "--log-level",
            "info",
            *extra,
        ]
        self.log = AgentLog()
        self.proc: subprocess.Popen[str] | None = None
        self.started = 0.0
        self.port = 0

    def start(self) -> Agent:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: stop() reaches compile children
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.add(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_port(self, timeout: float = 60.0) -> int:
        if self.log.wait_for("admin HTTP listening", timeout) is None:
            self._fail("no admin HTTP line")
        for _, line in self.log.lines:
            match = ADMIN_LINE.search(line)
            if match:
                self.port = int(match.group(2))
        return self.port

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from start until /readyz answers 200."""
        if not self.port:
            self.wait_port(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                if self.get("/readyz", timeout=2)[0] == 200:
                    return time.monotonic() - self.started
            time.sleep(0.02)
        self._fail("not ready")
        return 0.0

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[1].decode())

    def wait_metric(
        self, name: str, ok: Callable[[float], bool], timeout: float = 120.0, poll: float = 0.1
    ) -> float:
        """Seconds from start until metric `name` (summed over labels) satisfies `ok`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                if ok(metric(self.metrics(), name)):
                    return time.monotonic() - self.started
            time.sleep(poll)
        self._fail(f"metric {name} never reached the condition")
        return 0.0

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def wait_settled(
        self, share: float = 0.05, interval: float = 2.0, timeout: float = 90.0
    ) -> float:
        """Seconds from start until the agent used < `share` of a CPU over `interval`.

        Start-up does not end with the first window: the background indexer then
        indexes the binaries of every process sampled so far (on a busy host, for tens
        of seconds). Gives up after `timeout` (returns the time anyway).
        """
        deadline = time.monotonic() + timeout
        while True:
            before = self.cpu_seconds()
            time.sleep(interval)
            self._check_alive()
            if self.cpu_seconds() - before < share * interval or time.monotonic() > deadline:
                return time.monotonic() - self.started

    def rss_kib(self) -> int:
        return status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return status_kib(self.pid, "VmHWM")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self._fail(f"exited with {self.proc.returncode}")

    def _fail(self, why: str) -> None:
        tail = "\n".join(self.log.text().splitlines()[-30:])
        self.stop()
        raise RuntimeError(f"agent: {why}\n--- agent log (tail) ---\n{tail}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the agent flushes its window), then SIGKILL the group after `timeout`."""
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover children of its group
        return self.proc.returncode

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value} (labels kept verbatim)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def metric(values: dict[str, float], name: str) -> float:
    """Sum of metric `name` over all its label sets (0 when absent)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary work directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"strobe-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
