"""Separate debug files: by build id (.build-id tree) and by .gnu_debuglink (gdb's order, CRC)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.elf.reader import ElfInfo
from agent.model import Location, ProcessInfo
from agent.process.reader import read_process
from agent.symbolize.debugfiles import build_id_path, find_debug_file
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import addr2line, running, runtime_address, symbol_range


def split_debug(source: Path, directory: Path, debuglink: bool) -> tuple[Path, Path]:
    """A fully stripped copy of source and its debug file (objcopy/strip, as distros do)."""
    objcopy, strip = require_tool("objcopy"), require_tool("strip")
    directory.mkdir(parents=True, exist_ok=True)
    binary = Path(shutil.copy(source, directory / "spin"))
    debug = directory / "spin.debug"
    subprocess.run([objcopy, "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run([strip, "--strip-all", str(binary)], check=True)
    if debuglink:
        subprocess.run([objcopy, f"--add-gnu-debuglink={debug}", str(binary)], check=True)
    return binary, debug


def symbolize_inner(
    symbolizer: Symbolizer, process: ProcessInfo, binary: Path, debug: Path
) -> Location:
    start, _ = symbol_range(debug, "inner_spin")  # the stripped binary has no .symtab
    address = runtime_address(binary, start + 8, process.mappings)
    (location,) = symbolizer.symbolize(process, (address,), ())
    return location


def capture(pid: int) -> ProcessInfo:
    info = read_process(pid)
    assert info is not None
    return info


def test_debug_file_found_by_build_id(c_binaries: Path, tmp_path: Path) -> None:
    binary, debug = split_debug(c_binaries / "spin_pie", tmp_path / "bin", debuglink=False)
    build_id = ElfInfo.read(str(binary)).build_id
    debug_dir = tmp_path / "debug"
    target = build_id_path(debug_dir, build_id)
    target.parent.mkdir(parents=True)
    shutil.move(debug, target)
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer(debug_dirs=[str(debug_dir)])
        before = symbolize_inner(symbolizer, process, binary, target)
        assert before.frames == () and before.build_id == build_id  # stripped: no name
        assert symbolizer.prepare(process) >= 1
        after = symbolize_inner(symbolizer, process, binary, target)
        start, _ = symbol_range(target, "inner_spin")
        assert [(f.function, f.file, f.line) for f in after.frames] == addr2line(target, start + 8)
        assert after.frames[0].function == "inner_spin"


def test_without_the_debug_file_a_stripped_frame_keeps_its_address(
    c_binaries: Path, tmp_path: Path
) -> None:
    binary, debug = split_debug(c_binaries / "spin_pie", tmp_path / "bin", debuglink=False)
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer(debug_dirs=[str(tmp_path / "no-such-dir")])
        symbolizer.prepare(process)
        location = symbolize_inner(symbolizer, process, binary, debug)
        assert location.frames == () and location.mapping is not None
        assert location.mapping.path == str(binary) and location.build_id


def place_debuglink_file(binary: Path, debug: Path, where: str, debug_dir: Path) -> Path:
    directory = {
        "same": binary.parent,
        ".debug": binary.parent / ".debug",
        "debug-dir": debug_dir / str(binary.parent).lstrip("/"),
    }[where]
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(debug, directory / debug.name))


@pytest.mark.parametrize("where", ["same", ".debug", "debug-dir"])
def test_debug_file_found_by_debuglink(c_binaries: Path, tmp_path: Path, where: str) -> None:
    binary, debug = split_debug(c_binaries / "spin_pie", tmp_path / "bin", debuglink=True)
    debug_dir = tmp_path / "debug"
    placed = place_debuglink_file(binary, debug, where, debug_dir)
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer(debug_dirs=[str(debug_dir)])
        assert symbolize_inner(symbolizer, process, binary, placed).frames == ()
        assert symbolizer.prepare(process) >= 1
        frame = symbolize_inner(symbolizer, process, binary, placed).frames[0]
        assert frame.function == "inner_spin" and frame.file.endswith("spin.c") and frame.line


def test_debuglink_with_wrong_crc_is_ignored(c_binaries: Path, tmp_path: Path) -> None:
    binary, debug = split_debug(c_binaries / "spin_pie", tmp_path / "bin", debuglink=True)
    good = Path(shutil.move(debug, tmp_path / "good.debug"))
    _, other = split_debug(c_binaries / "spin_nopie", tmp_path / "other", debuglink=False)
    shutil.copy(other, binary.parent / "spin.debug")  # right name, wrong contents
    info = ElfInfo.read(str(binary))
    assert find_debug_file(str(binary), "", info.debuglink, debug_dirs=[]) is None
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer(debug_dirs=[str(tmp_path / "debug")])
        symbolizer.prepare(process)
        assert symbolize_inner(symbolizer, process, binary, good).frames == ()


def test_gdb_search_order_prefers_the_binary_directory(c_binaries: Path, tmp_path: Path) -> None:
    binary, debug = split_debug(c_binaries / "spin_pie", tmp_path / "bin", debuglink=True)
    debug_dir = tmp_path / "debug"
    nested = debug_dir / str(binary.parent).lstrip("/")
    nested.mkdir(parents=True)
    shutil.copy(debug, nested / debug.name)
    info = ElfInfo.read(str(binary))
    found = find_debug_file(str(binary), "", info.debuglink, debug_dirs=[str(debug_dir)])
    assert found == debug  # the same directory comes before the debug directory
    debug.unlink()
    found = find_debug_file(str(binary), "", info.debuglink, debug_dirs=[str(debug_dir)])
    assert found == nested / debug.name


def test_build_id_lookup_inside_a_root(c_binaries: Path, tmp_path: Path) -> None:
    # A container's /proc/PID/root is a directory like this one.
    binary, debug = split_debug(c_binaries / "spin_pie", tmp_path / "bin", debuglink=False)
    build_id = ElfInfo.read(str(binary)).build_id
    root = tmp_path / "root"
    target = build_id_path(root / "usr/lib/debug", build_id)
    target.parent.mkdir(parents=True)
    shutil.copy(debug, target)
    assert find_debug_file("/usr/bin/spin", build_id, None, roots=[root]) == target
    assert find_debug_file("/usr/bin/spin", build_id, None, roots=[tmp_path / "bin"]) is None
    # A file filed under another build id is not trusted: its own note must match.
    wrong_id = build_id[:-1] + ("0" if build_id[-1] != "0" else "1")
    misfiled = build_id_path(root / "usr/lib/debug", wrong_id)
    shutil.copy(debug, misfiled)
    assert find_debug_file("/usr/bin/spin", wrong_id, None, roots=[root]) is None
