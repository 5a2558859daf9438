"""Command line: `strobe run`, `strobe record`, `strobe --version`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from agent.commands import early_signals
from agent.config import (
    RECORD,
    RUN,
    TOP,
    Config,
    ConfigError,
    add_arguments,
    build_config,
    parse_duration,
)
from agent.metrics import package_version

log = logging.getLogger("strobe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strobe", description="Strobe: an eBPF continuous profiler for Linux."
    )
    parser.add_argument("--version", action="version", version=f"strobe {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        RUN,
        help="Run the agent: profile every process, one profile per window.",
        description="Run the agent: sample every process's on-CPU stacks, symbolize them on "
        "the node, and write one profile per window to the local store (default) and/or a "
        "remote store. SIGTERM/SIGINT flush the current window and exit.",
    )
    add_arguments(run, RUN)
    record = commands.add_parser(
        RECORD,
        help="Record one profile to a file.",
        description="Record a single profile of the whole host (or --pid) to a pprof file.",
    )
    record.add_argument(
        "--duration",
        required=True,
        metavar="SECONDS",
        help="How long to sample (e.g. 10, 30s, 2m).",
    )
    record.add_argument(
        "--output",
        "-o",
        required=True,
        type=Path,
        metavar="FILE",
        help="Where to write the gzipped pprof profile.",
    )
    record.add_argument("--pid", type=int, metavar="PID", help="Profile only this process.")
    record.add_argument(
        "--flamegraph",
        type=Path,
        metavar="FILE.svg",
        help="Also write a self-contained flame graph SVG of the profile.",
    )
    record.add_argument(
        "--symbolize-wait",
        metavar="DURATION",
        help="How long after sampling to wait for DWARF indexes and debuginfod downloads "
        "(0: no wait). Default: what is left of 5s after the duration, counted from the "
        "start, less 1.5s to name the frames, at least 1s: the file is written about 5s "
        "after the duration. Frames not ready by then keep their ELF name, or their "
        "address and mapping.",
    )
    add_arguments(record, RECORD)
    top = commands.add_parser(
        TOP,
        help="Live view of the hottest functions, like perf top.",
        description="Show the hottest functions system-wide (or of --pid), refreshed every "
        "--interval seconds. Ctrl-C quits.",
    )
    top.add_argument("--pid", type=int, metavar="PID", help="Only this process.")
    top.add_argument(
        "--interval", default="1", metavar="SECONDS", help="Refresh interval (default: 1)."
    )
    top.add_argument(
        "--iterations",
        type=int,
        metavar="N",
        help="Quit after N refreshes (default: until Ctrl-C).",
    )
    add_arguments(top, TOP)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def check_pid(pid: int | None) -> None:
    """Refuse a --pid that names no process: it would only ever yield an empty profile."""
    from agent.process.reader import process_exists

    if pid is not None and not process_exists(pid):
        raise ConfigError(f"flag --pid: process {pid} does not exist")


def check_cache_dir(config: Config) -> None:
    """The cache dir (headers tree, BPF programs, symbol indexes, token) must be a
    directory we can write: found out now, not as a traceback deep in the start-up."""
    path = Path(config.cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise  # not root: known_failure says which privileges
    except OSError as exc:
        why = "not a directory" if isinstance(exc, FileExistsError) else exc.strerror or exc
        raise ConfigError(
            f"cache_dir: cannot use {path}: {why}; choose a writable directory with --cache-dir"
        ) from None


def dispatch(args: argparse.Namespace, config: Config) -> int:
    check_cache_dir(config)
    if args.command == RUN:
        early_signals.install()  # before the heavy imports and the BPF load
        from agent.commands.daemon import run

        return run(config, reload_config=lambda: build_config(args, args.command))
    check_pid(args.pid)
    if args.command == TOP:
        from agent.commands.top import run_top_command

        return run_top_command(
            config,
            interval=parse_duration_arg("--interval", args.interval),
            pid=args.pid,
            iterations=args.iterations,
            stop=stop_on_signals(),
        )
    from agent.commands.record import record

    duration = parse_duration_arg("--duration", args.duration)
    return record(
        config,
        duration,
        args.output,
        args.pid,
        stop=stop_on_signals(),
        flamegraph=args.flamegraph,
        symbolize_wait=None
        if args.symbolize_wait is None
        else parse_duration_arg("--symbolize-wait", args.symbolize_wait, allow_zero=True),
    )


def parse_duration_arg(flag: str, value: str, allow_zero: bool = False) -> float:
    if allow_zero and value.strip() in ("0", "0s"):
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"flag {flag}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        config = build_config(args, args.command)
        setup_logging(config.log_level)
        return dispatch(args, config)
    except ConfigError as exc:
        print(f"strobe: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"strobe: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = known_failure(exc)
        if message is None:
            raise  # a bug: the traceback is what its report needs
        log.debug("failed: %s", message, exc_info=True)  # --log-level debug: the traceback
        print(f"strobe: {message}", file=sys.stderr)
        return 1


PRIVILEGE_FIX = (
    "run as root or grant CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE, "
    "CAP_DAC_READ_SEARCH, CAP_SYSLOG, and in a container seccomp unconfined "
    "(see docs/deploy.md)"
)
NOT_PERMITTED = ("Operation not permitted", "Permission denied")


def known_failure(exc: Exception) -> str | None:
    """One line saying what to do about a failure the host causes; None for a bug."""
    from agent.sampler.compile_parent import BpfCompileError
    from agent.sampler.kernel_headers import KernelHeadersError

    if isinstance(exc, KernelHeadersError):
        return str(exc)  # already names what was looked for and the fix
    if isinstance(exc, PermissionError):
        return f"not permitted to use {exc.filename or 'a resource'}: {PRIVILEGE_FIX}"
    if isinstance(exc, BpfCompileError) and any(text in str(exc) for text in NOT_PERMITTED):
        return f"not permitted to load the BPF sampler: {PRIVILEGE_FIX}"
    return None


class StartupError(RuntimeError):
    """The agent cannot start on this host; the message says what to do."""
