"""JIT frames from perf maps: a real process spinning in generated code that it
describes in /tmp/perf-PID.map, on the host and in a private mount + pid namespace
(whose /tmp the host cannot see, and whose pid differs from the host's)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.metrics import FRAMES
from agent.model import Mapping, ProcessInfo
from agent.process.reader import read_process
from agent.symbolize.perfmap import (
    PerfMap,
    PerfMaps,
    is_jit_candidate,
    parse_line,
    status_fields,
)
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import metric_value, require_tool
from tests.symbolize.helpers import DATA, compile_c, require_root

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def jit_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("jit")
    return compile_c([DATA / "jit.c"], out / "jit", "-O0", compiler=require_tool("gcc"))


@dataclass
class Jit:
    pid: int  # as the host sees it
    code: int  # start of the generated code
    process: ProcessInfo


def read_line(child: subprocess.Popen[bytes]) -> bytes:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
    if not ready:
        raise AssertionError("the JIT program printed nothing")
    return child.stdout.readline()


def descendant_named(pid: int, comm: str) -> int:
    """The first process under pid (itself included) whose comm is `comm`."""
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            if Path(f"/proc/{current}/comm").read_text().strip() == comm:
                return current
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    raise AssertionError(f"no {comm} under {pid}")


@contextlib.contextmanager
def running_jit(argv: list[str], comm: str) -> Iterator[Jit]:
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = read_line(child)
        assert line, f"{argv} exited with {child.wait(timeout=TIMEOUT)}"
        code = int(line, 16)
        pid = descendant_named(child.pid, comm)
        process = read_process(pid)
        assert process is not None
        try:
            yield Jit(pid, code, process)
        finally:
            os.kill(pid, signal.SIGKILL)  # pid 1 of a namespace ignores gentler signals
    finally:
        child.kill()
        child.wait(timeout=TIMEOUT)


def jit_counts() -> tuple[float, float]:
    return (
        metric_value(FRAMES, kind="jit", result="hit"),
        metric_value(FRAMES, kind="jit", result="miss"),
    )


def check_jit_frames(jit: Jit) -> None:
    mapping = next(m for m in jit.process.mappings if m.contains(jit.code))
    assert is_jit_candidate(mapping) and mapping.path == "" and "x" in mapping.perms
    symbolizer = Symbolizer(perf_maps=PerfMaps(recheck_seconds=0))
    assert symbolizer.prepare(jit.process) >= 0  # locates the perf map while the process lives
    hits, misses = jit_counts()
    stack = (jit.code + 0x81, jit.code + 0x11, jit.code + 0x400)
    locations = symbolizer.symbolize(jit.process, stack, ())
    names = [loc.frames[0].function if loc.frames else "" for loc in locations]
    assert names == ["LazyCompile:~hot_loop /app/main.js:3", "jit_prologue", ""]
    assert all(loc.mapping == mapping for loc in locations)
    assert [loc.address for loc in locations] == list(stack)
    symbolizer.end_window()  # publishes the frame counts
    assert jit_counts() == (hits + 2, misses + 1)
    symbolizer.close()


def test_perf_map_of_a_host_process(jit_binary: Path) -> None:
    with running_jit([str(jit_binary)], "jit") as jit:
        perf_map = Path(f"/tmp/perf-{jit.pid}.map")
        try:
            check_jit_frames(jit)
            # The JIT appends code later: the grown file is read again.
            symbolizer = Symbolizer(perf_maps=PerfMaps(recheck_seconds=0))
            later = jit.code + 0x400
            assert symbolizer.symbolize(jit.process, (later,), ())[0].frames == ()
            with open(perf_map, "a") as f:
                f.write(f"{later:x} 10 later_compiled\n")
            (location,) = symbolizer.symbolize(jit.process, (later,), ())
            assert location.frames[0].function == "later_compiled"
        finally:
            perf_map.unlink(missing_ok=True)


def test_perf_map_in_a_private_mount_and_pid_namespace(jit_binary: Path) -> None:
    require_root()
    unshare = require_tool("unshare")
    # The binary lives under the host's /tmp, hidden by the new tmpfs: carry it over by fd.
    script = (
        f"exec 3<{jit_binary}; mount -t tmpfs tmpfs /tmp && cat <&3 >/tmp/jit && "
        "chmod +x /tmp/jit && exec /tmp/jit"
    )
    argv = [unshare, "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
    argv.append("--mount-proc")
    with running_jit([*argv, "sh", "-c", script], "jit") as jit:
        nspid = status_fields(jit.pid)["NSpid"].split()[-1]
        assert int(nspid) != jit.pid  # the file is named by a pid the host does not use
        assert not Path(f"/tmp/perf-{jit.pid}.map").exists()
        assert not Path(f"/tmp/perf-{nspid}.map").exists() or nspid == "1"
        assert Path(f"/proc/{jit.pid}/root/tmp/perf-{nspid}.map").is_file()
        check_jit_frames(jit)


# --- the file format and hostile files --------------------------------------------


def test_parse_line() -> None:
    assert parse_line(b"7f00aa 40 Interpreted:foo bar baz\n") == (
        0x7F00AA,
        0x40,
        "Interpreted:foo bar baz",
    )
    assert parse_line(b"0x10 0x8 py::f:/x.py") == (0x10, 8, "py::f:/x.py")
    for bad in (b"", b"zz 10 f", b"10 0 empty", b"10 10", b"-10 10 neg"):
        assert parse_line(bad) is None


def test_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "perf.map"
    path.write_bytes(b"1000 10 first\n2000 10 sec")
    perf_map = PerfMap(path, frozenset())
    perf_map.refresh()
    assert (perf_map.lookup(0x1005), perf_map.lookup(0x2005)) == ("first", None)
    with open(path, "ab") as f:
        f.write(b"ond\n1000 10 recompiled\n")
    perf_map.refresh()
    assert (perf_map.lookup(0x1005), perf_map.lookup(0x2005)) == ("recompiled", "second")
    assert perf_map.lookup(0x1010) is None and perf_map.lookup(0xFFF) is None


def test_replaced_file_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "perf.map"
    path.write_bytes(b"1000 10 old\n" * 50)
    perf_map = PerfMap(path, frozenset())
    perf_map.refresh()
    path.unlink()
    path.write_bytes(b"3000 10 new\n")
    perf_map.refresh()
    assert (perf_map.lookup(0x1000), perf_map.lookup(0x3000)) == (None, "new")


def test_fifo_symlink_and_foreign_owner_are_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.map"
    os.mkfifo(fifo)
    PerfMap(fifo, frozenset()).refresh()  # would block forever if it were read
    secret = tmp_path / "secret"
    secret.write_text("1000 10 leaked\n")
    link = tmp_path / "link.map"
    link.symlink_to(secret)
    followed = PerfMap(link, frozenset())
    followed.refresh()
    assert followed.lookup(0x1000) is None
    foreign = PerfMap(secret, frozenset({os.getuid() + 1}))
    foreign.refresh()
    assert foreign.lookup(0x1000) is None


def test_gone_process_without_a_file_is_a_miss(tmp_path: Path) -> None:
    jit = Mapping(0x7F0000000000, 0x7F0000001000, 0, "", "00:00", 0, "rwxp")
    process = ProcessInfo(pid=2**22 + 7, start_time=1, comm="gone", exe="", mappings=(jit,))
    (location,) = Symbolizer(perf_maps=PerfMaps(recheck_seconds=0)).symbolize(
        process, (0x7F0000000010,), ()
    )
    assert location.frames == () and location.mapping == jit
