"""What a host can throw at the symbolizer: no exception, the frame keeps its address,
and the reason is counted in strobe_binary_errors."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from agent.elf.reader import ElfInfo, ElfReadError
from agent.metrics import BINARY_ERRORS, FRAMES
from agent.model import Mapping, ProcessInfo
from agent.process.reader import read_process
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import metric_value
from tests.symbolize.helpers import (
    address_in_mapping,
    call_without_file_capabilities,
    exited_pid,
    require_root,
    running,
    runtime_address,
    symbol_vaddr,
)

BASE = 0x7F3400000000


def errors(reason: str) -> float:
    return metric_value(BINARY_ERRORS, reason=reason)


def misses(kind: str = "user") -> float:
    return metric_value(FRAMES, kind=kind, result="miss")


def fake_process(path: Path) -> ProcessInfo:
    """A process (pid 0: opened by host path) that maps `path` as its code."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    mapping = Mapping(BASE, BASE + 0x10000, 0x1000, str(path), dev, st.st_ino, "r-xp")
    return ProcessInfo(pid=0, start_time=0, comm="bad", exe=str(path), mappings=(mapping,))


def assert_unsymbolized(symbolizer: Symbolizer, process: ProcessInfo) -> None:
    stack = (BASE + 0x1234, BASE + 0x2000)
    locations = symbolizer.symbolize(process, stack, ())
    assert [loc.address for loc in locations] == list(stack)
    assert all(loc.frames == () and loc.mapping == process.mappings[0] for loc in locations)


def truncated(source: Path, target: Path, size: int) -> Path:
    target.write_bytes(source.read_bytes()[:size])
    return target


@pytest.mark.parametrize("cut", ["header", "half"])
def test_truncated_elf(c_binaries: Path, tmp_path: Path, cut: str) -> None:
    source = c_binaries / "spin_pie"
    size = 200 if cut == "header" else source.stat().st_size // 2
    path = truncated(source, tmp_path / "cut", size)
    with pytest.raises(ElfReadError):
        ElfInfo.read(str(path))
    before = errors("malformed")
    assert_unsymbolized(Symbolizer(), fake_process(path))
    assert errors("malformed") == before + 1


@pytest.mark.parametrize("prefix", [b"", b"\x7fELF\x02\x01\x01"])
def test_random_bytes(tmp_path: Path, prefix: bytes) -> None:
    path = tmp_path / "noise"
    path.write_bytes(prefix + random.Random(7).randbytes(8192))
    before = errors("malformed")
    assert_unsymbolized(Symbolizer(), fake_process(path))
    assert errors("malformed") == before + 1


def test_a_broken_binary_is_not_retried_on_every_sample(tmp_path: Path) -> None:
    path = tmp_path / "noise"
    path.write_bytes(random.Random(8).randbytes(4096))
    symbolizer, process = Symbolizer(), fake_process(path)
    before = errors("malformed")
    for _ in range(5):
        assert_unsymbolized(symbolizer, process)
    assert errors("malformed") == before + 1


def test_unreadable_binary(c_binaries: Path, tmp_path: Path) -> None:
    path = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "secret"))
    path.chmod(0)
    process = fake_process(path)
    before = errors("permission")
    call_without_file_capabilities(lambda: assert_unsymbolized(Symbolizer(), process))
    assert errors("permission") == before + 1


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    before = errors("unreadable")
    assert_unsymbolized(Symbolizer(), fake_process(directory))
    assert errors("unreadable") == before + 1


def test_file_replaced_at_the_same_path_is_not_trusted(c_binaries: Path, tmp_path: Path) -> None:
    path = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "app"))
    process = fake_process(path)  # identity of the original file
    with open(path, "rb"):  # still in use (as by a process mapping it): inode not reused
        path.unlink()
        shutil.copy(c_binaries / "spin_nopie", path)  # another file at the same path
        assert os.stat(path).st_ino != process.mappings[0].inode
        before = errors("not_found")
        assert_unsymbolized(Symbolizer(), process)
        assert errors("not_found") == before + 1


def test_vanished_process() -> None:
    pid = exited_pid()
    assert read_process(pid) is None
    before = misses()
    symbolizer = Symbolizer()
    locations = symbolizer.symbolize(None, (0x401000, 0x401234), ())
    assert [(loc.address, loc.mapping, loc.frames) for loc in locations] == [
        (0x401000, None, ()),
        (0x401234, None, ()),
    ]
    symbolizer.end_window()  # frame counts reach the metric once per window
    assert misses() == before + 2


def test_exited_process_whose_binary_was_deleted(c_binaries: Path, tmp_path: Path) -> None:
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "gone"))
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = read_process(pid)
        assert process is not None
    vaddr = symbol_vaddr(binary, "inner_spin")
    address = runtime_address(binary, vaddr, process.mappings)
    binary.unlink()  # and the process has exited: no path and no map_files left
    before = errors("not_found")
    (location,) = Symbolizer().symbolize(process, (address,), ())
    assert location.frames == () and location.address == address
    assert location.mapping is not None and location.mapping.path == str(binary)
    assert errors("not_found") == before + 1


def test_a_file_that_failed_to_open_is_memoized_until_its_retry(
    c_binaries: Path, tmp_path: Path
) -> None:
    """Its frames are not looked up again on every stack (1,000 such processes would
    cost ten times more per window), and its retry time still comes."""
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "moved"))
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = read_process(pid)
        assert process is not None
    address = runtime_address(binary, symbol_vaddr(binary, "inner_spin"), process.mappings)
    binary.rename(tmp_path / "elsewhere")  # the process has exited: nothing to open
    symbolizer = Symbolizer(retry_seconds=0.5)
    (first,) = symbolizer.symbolize(process, (address,), ())
    (again,) = symbolizer.symbolize(process, (address,), ())
    assert first.frames == () and again is first  # memoized
    (tmp_path / "elsewhere").rename(binary)  # back, the same inode
    (before_retry,) = symbolizer.symbolize(process, (address,), ())
    assert before_retry is first
    time.sleep(0.6)
    (retried,) = symbolizer.symbolize(process, (address,), ())
    assert [f.function for f in retried.frames] == ["inner_spin"]
    symbolizer.close()


def test_addresses_outside_any_mapping_and_without_kallsyms() -> None:
    process = read_process(os.getpid())
    assert process is not None
    locations = Symbolizer().symbolize(process, (0, 1, 2**64 - 1), (0xFFFFFFFF81000000,))
    assert [loc.kernel for loc in locations] == [True, False, False, False]
    assert all(not loc.symbolized for loc in locations)
    assert all(loc.mapping is None for loc in locations)


def test_anonymous_executable_memory_keeps_its_mapping() -> None:
    jit = Mapping(0x7F0000000000, 0x7F0000001000, 0, "", "00:00", 0, "rwxp")
    process = ProcessInfo(pid=os.getpid(), start_time=0, comm="jit", exe="", mappings=(jit,))
    (location,) = Symbolizer().symbolize(process, (0x7F0000000010,), ())
    assert location.mapping == jit and location.frames == () and location.build_id == ""


def test_map_files_needs_root_for_a_deleted_binary_of_a_live_process(
    c_binaries: Path, tmp_path: Path
) -> None:
    require_root()
    binary = Path(shutil.copy(c_binaries / "spin_pie", tmp_path / "deleted"))
    vaddr = symbol_vaddr(binary, "inner_spin")
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        binary.unlink()
        process = read_process(pid)
        assert process is not None
        mapping = next(m for m in process.mappings if m.path == str(binary))
        assert mapping.inode  # "(deleted)" was stripped, identity kept
        address = address_in_mapping(c_binaries / "spin_pie", vaddr, mapping)
        (location,) = Symbolizer().symbolize(process, (address,), ())
        assert location.frames[0].function == "inner_spin"
