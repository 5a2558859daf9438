"""Helpers for symbolization tests: real processes, and addresses computed independently.

Addresses are computed here with pyelftools and the raw program headers, not with
agent.elf.reader, so a bug in the translation under test cannot hide itself.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.model import Mapping

DATA = Path(__file__).resolve().parent / "data"
PAGE = 4096
T = TypeVar("T")


@contextmanager
def running(argv: list[str], mapped: str, timeout: float = 30.0) -> Iterator[int]:
    """Run argv until the block ends; yields its pid once `mapped` has executable code
    mapped (ld.so maps a library in steps: the whole file first, then its segments)."""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not _maps_code_of(child.pid, mapped):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} never mapped {mapped} (exit {child.poll()})")
            time.sleep(0.01)
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=timeout)


def _maps_code_of(pid: int, path: str) -> bool:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(
        line.endswith(path) and line.split()[1].startswith("r-x") and " " + path in line
        for line in lines
    )


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(timeout=30)
    return child.pid


def symbol_range(path: Path, name: str) -> tuple[int, int]:
    """(ELF virtual address, size) of a function symbol, from .symtab."""
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection), f"{path} has no .symtab"
        for symbol in symtab.iter_symbols():
            if symbol.name == name and symbol["st_info"]["type"] == "STT_FUNC":
                return int(symbol["st_value"]), int(symbol["st_size"])
    raise KeyError(name)


def symbol_vaddr(path: Path, name: str) -> int:
    """ELF virtual address of a function symbol, from .symtab."""
    return symbol_range(path, name)[0]


def file_offset_of(path: Path, vaddr: int) -> int:
    with open(path, "rb") as f:
        for segment in ELFFile(f).iter_segments():
            h = segment.header
            if h.p_type == "PT_LOAD" and h.p_vaddr <= vaddr < h.p_vaddr + h.p_filesz:
                return int(vaddr - h.p_vaddr + h.p_offset)
    raise ValueError(f"{vaddr:#x} is in no PT_LOAD of {path}")


def runtime_address(path: Path, vaddr: int, mappings: tuple[Mapping, ...]) -> int:
    """Where the loader put `vaddr` of `path`, given the process's mappings."""
    offset = file_offset_of(path, vaddr)
    inode = os.stat(path).st_ino
    for m in mappings:
        if m.inode == inode and m.offset <= offset < m.offset + (m.end - m.start):
            return m.start + offset - m.offset
    raise ValueError(f"offset {offset:#x} of {path} is not mapped")


def address_in_mapping(layout: Path, vaddr: int, mapping: Mapping) -> int:
    """Runtime address of vaddr in a mapping of a file laid out like `layout`

    (for mapped files that were deleted or replaced since)."""
    offset = file_offset_of(layout, vaddr)
    assert mapping.offset <= offset < mapping.offset + (mapping.end - mapping.start)
    return mapping.start + offset - mapping.offset


def loader_mappings(path: Path, base: int) -> tuple[Mapping, ...]:
    """Executable mappings as ld.so would create them for `path` loaded at `base`."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    mappings = []
    with open(path, "rb") as f:
        for segment in ELFFile(f).iter_segments():
            h = segment.header
            if h.p_type != "PT_LOAD" or not h.p_flags & 1:  # PF_X
                continue
            start = base + h.p_vaddr // PAGE * PAGE
            end = base + -(-(h.p_vaddr + h.p_memsz) // PAGE) * PAGE
            offset = h.p_offset // PAGE * PAGE
            mappings.append(Mapping(start, end, offset, str(path), dev, st.st_ino, "r-xp"))
    return tuple(mappings)


def addr2line(binary: Path, vaddr: int, demangle: bool = False) -> list[tuple[str, str, int]]:
    """(function, file, line) frames innermost first, as binutils' addr2line says."""
    out = subprocess.run(
        ["addr2line", "-f", "-i", *(["-C"] if demangle else []), "-e", str(binary), f"{vaddr:#x}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    frames = []
    for function, location in zip(out[0::2], out[1::2], strict=True):
        file, _, line = location.split(" (discriminator")[0].rpartition(":")
        frames.append((function, file, int(line) if line.isdigit() else 0))
    return frames


def compile_c(sources: list[Path], output: Path, *flags: str, compiler: str = "gcc") -> Path:
    subprocess.run(
        [compiler, *flags, "-o", str(output), *map(str, sources)], check=True, timeout=120
    )
    return output


def require_root() -> None:
    """Root-only tests fail in CI (STROBE_REQUIRE_BPF=1, which runs as root) and skip elsewhere."""
    if os.geteuid() == 0:
        return
    if os.environ.get("STROBE_REQUIRE_BPF") == "1":
        pytest.fail("this test needs root")
    pytest.skip("this test needs root")


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
_CAPABILITY_VERSION_3 = 0x20080522


def _drop_file_capabilities() -> None:
    # capset(2) with pid 0 changes only the calling thread's capabilities.
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # 2 x {effective, permitted, inheritable}
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0] &= ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def call_without_file_capabilities(function: Callable[[], T]) -> T:
    """Run function in a thread that cannot bypass file permissions, even as root."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            if os.geteuid() == 0:
                _drop_file_capabilities()
            outcome["value"] = function()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])
