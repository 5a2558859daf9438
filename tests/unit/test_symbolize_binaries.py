"""Opening a mapped file as its process sees it, and the binary cache."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from agent.elf.mapped_files import open_mapped_file, process_root
from agent.elf.reader import ElfInfo
from agent.metrics import SYMBOL_CACHE_BINARIES
from agent.model import Mapping, ProcessInfo
from agent.process.reader import read_process
from agent.symbolize.background_indexer import BackgroundIndexer
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import metric_value, require_tool
from tests.symbolize.helpers import (
    address_in_mapping,
    loader_mappings,
    require_root,
    running,
    runtime_address,
    symbol_vaddr,
)


def capture(pid: int) -> ProcessInfo:
    info = read_process(pid)
    assert info is not None
    return info


def mapping_of(process: ProcessInfo, path: Path) -> Mapping:
    return next(m for m in process.mappings if m.path == str(path))


def test_own_root_is_the_host_root() -> None:
    assert process_root(os.getpid()) == Path("/")


def test_path_inside_the_process_root_is_preferred(c_binaries: Path, tmp_path: Path) -> None:
    # A fake /proc whose PID/root points at a container-like tree.
    container = tmp_path / "container"
    (container / "usr/bin").mkdir(parents=True)
    inside = Path(shutil.copy(c_binaries / "spin_pie", container / "usr/bin/app"))
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "root").symlink_to(container)
    st = inside.stat()
    dev = f"{os.major(st.st_dev):x}:{os.minor(st.st_dev):x}"
    mapping = Mapping(0x1000, 0x2000, 0x1000, "/usr/bin/app", dev, st.st_ino)
    opened = open_mapped_file(42, mapping, proc)
    assert opened is not None
    assert opened.path == str(proc / "42/root/usr/bin/app")
    assert opened.root == proc / "42" / "root"  # debug files are looked up in there too
    other_inode = Mapping(0x1000, 0x2000, 0x1000, "/usr/bin/app", dev, st.st_ino + 1)
    assert open_mapped_file(42, other_inode, proc) is None  # identity must match


def test_binary_replaced_under_a_live_process(c_binaries: Path, tmp_path: Path) -> None:
    require_root()  # /proc/PID/map_files needs CAP_SYS_ADMIN
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "app"))
    original_id = ElfInfo.read(str(binary)).build_id
    vaddr = symbol_vaddr(binary, "inner_spin")
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        replacement = Path(shutil.copy(c_binaries / "spin_nopie", tmp_path / "app.new"))
        os.replace(replacement, binary)  # an upgrade: new file at the same path
        mapping = mapping_of(process, binary)
        address = address_in_mapping(c_binaries / "spin_pie", vaddr, mapping)
        (location,) = Symbolizer().symbolize(process, (address,), ())
        assert location.frames[0].function == "inner_spin"
        assert location.build_id == original_id != ElfInfo.read(str(binary)).build_id


def test_binary_only_visible_in_another_mount_namespace(c_binaries: Path, tmp_path: Path) -> None:
    require_root()
    unshare = require_tool("unshare")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    script = (
        f"mount -t tmpfs tmpfs {hidden} && cp {c_binaries / 'spin_pie'} {hidden}/app"
        f" && exec {hidden}/app 60"
    )
    argv = [unshare, "--mount", "--propagation", "private", "sh", "-c", script]
    vaddr = symbol_vaddr(c_binaries / "spin_pie", "inner_spin")
    with running(argv, mapped=f"{hidden}/app") as pid:
        assert not (hidden / "app").exists()  # not in our mount namespace
        process = capture(pid)
        mapping = mapping_of(process, hidden / "app")
        address = address_in_mapping(c_binaries / "spin_pie", vaddr, mapping)
        (location,) = Symbolizer().symbolize(process, (address,), ())
        assert location.frames[0].function == "inner_spin"


def test_binaries_are_cached_by_build_id(c_binaries: Path, tmp_path: Path) -> None:
    first = c_binaries / "spin_pie"
    second = Path(shutil.copy(first, tmp_path / "copy"))  # same build id, other inode
    symbolizer = Symbolizer()
    for binary in (first, second):
        process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, 0x7F5600000000))
        address = runtime_address(binary, symbol_vaddr(binary, "main"), process.mappings)
        (location,) = symbolizer.symbolize(process, (address,), ())
        assert location.frames[0].function == "main"
    assert symbolizer.binary_count() == 1


def test_binary_cache_is_bounded(c_binaries: Path) -> None:
    symbolizer = Symbolizer(max_binaries=1)
    for _ in range(2):
        for name in ("spin_pie", "spin_nopie", "libspin.so"):
            binary = c_binaries / name
            base = 0 if name == "spin_nopie" else 0x7F5700000000
            process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, base))
            function = "lib_spin" if name == "libspin.so" else "main"
            address = runtime_address(binary, symbol_vaddr(binary, function), process.mappings)
            (location,) = symbolizer.symbolize(process, (address,), ())
            assert location.frames[0].function == function
            assert symbolizer.binary_count() == 1
            assert metric_value(SYMBOL_CACHE_BINARIES) == 1


def test_prepare_beside_symbolize(c_binaries: Path) -> None:
    binary = c_binaries / "spin_pie"
    process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, 0x7F5800000000))
    address = runtime_address(binary, symbol_vaddr(binary, "inner_spin") + 8, process.mappings)
    symbolizer = Symbolizer()
    failures: list[BaseException] = []

    def background() -> None:
        try:
            symbolizer.prepare(process)
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=background)
    worker.start()
    while worker.is_alive():  # the sampling side keeps going meanwhile
        (location,) = symbolizer.symbolize(process, (address,), ())
        assert location.frames[0].function == "inner_spin"
    worker.join()
    assert not failures
    (location,) = symbolizer.symbolize(process, (address,), ())
    assert location.frames[0].line > 0  # DWARF is used once ready


def test_background_indexer_builds_what_symbolize_queued(c_binaries: Path) -> None:
    binary = c_binaries / "spin_pie"
    process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, 0x7F5900000000))
    address = runtime_address(binary, symbol_vaddr(binary, "inner_spin") + 8, process.mappings)
    symbolizer = Symbolizer()
    assert symbolizer.symbolize(process, (address,), ())[0].frames[0].line == 0
    assert symbolizer.pending() == 1
    indexer = BackgroundIndexer(symbolizer, interval=0.05)
    indexer.start()
    try:
        indexer.wake()
        deadline = time.monotonic() + 60
        while symbolizer.symbolize(process, (address,), ())[0].frames[0].line == 0:
            assert time.monotonic() < deadline, "DWARF index never became ready"
            time.sleep(0.02)
    finally:
        indexer.stop()
    assert symbolizer.pending() == 0


def libc_path() -> str:
    """libc as /proc/PID/maps names it (this process maps it too)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libc.so" in path:
            return path
    raise AssertionError("this process maps no libc")


def test_only_a_process_with_a_binary_left_to_open_or_index_is_handed_to_the_indexer(
    c_binaries: Path, tmp_path: Path
) -> None:
    """Under churn the same few binaries come again and again: once they are open and
    indexed, a new process mapping them gives the indexer thread nothing to do (and is
    not handed over); a new binary, or JIT code, does."""
    binary = c_binaries / "spin_pie"
    libc = libc_path()  # mapped by ld.so after the exec: the capture must hold it
    symbolizer = Symbolizer(cache_dir=tmp_path)
    with running([str(binary), "60"], mapped=libc) as pid:
        first = capture(pid)
        assert symbolizer.needs_prepare(first)
        symbolizer.prepare(first)
        assert not symbolizer.needs_prepare(first)
    with running([str(binary), "60"], mapped=libc) as pid:
        again = capture(pid)  # another process of the same binaries
        assert again.pid != first.pid and not symbolizer.needs_prepare(again)
        jit = Mapping(0x7F0000000000, 0x7F0000001000, 0, "", "00:00", 0, "r-xp")
        assert symbolizer.needs_prepare(
            ProcessInfo(again.pid, again.start_time, again.comm, again.exe, (*again.mappings, jit))
        )
    indexer = BackgroundIndexer(symbolizer)  # not started: what it was handed stays queued
    indexer.watch(again)
    assert indexer.queued() == 0
    sleep = os.path.realpath("/bin/sleep")
    with running([sleep, "60"], mapped=sleep) as pid:
        other = capture(pid)
        indexer.watch(other)
        assert indexer.queued() == 1
