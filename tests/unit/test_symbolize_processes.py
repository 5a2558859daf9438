"""Symbolize addresses of real running processes: PIE, non-PIE, a shared library.

Each address is computed independently (symbol vaddr -> file offset -> the
process's own mapping), symbolized back, and compared with binutils' addr2line.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.elf.mapped_files import own_vdso
from agent.model import Location, ProcessInfo
from agent.process.reader import read_process
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import (
    addr2line,
    running,
    runtime_address,
    symbol_range,
    symbol_vaddr,
)


def build_id_of(binary: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID" in line)


def capture(pid: int) -> ProcessInfo:
    info = read_process(pid)
    assert info is not None
    return info


def symbolize_one(symbolizer: Symbolizer, process: ProcessInfo, address: int) -> Location:
    (location,) = symbolizer.symbolize(process, (address,), ())
    assert location.address == address and not location.kernel
    return location


def as_tuples(location: Location) -> list[tuple[str, str, int]]:
    return [(f.function, f.file, f.line) for f in location.frames]


@pytest.mark.parametrize("name", ["spin_pie", "spin_nopie"])
def test_names_functions_of_a_running_executable(c_binaries: Path, name: str) -> None:
    binary = c_binaries / name
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer()
        for function in ("inner_spin", "outer_function", "main"):
            vaddr = symbol_vaddr(binary, function)
            address = runtime_address(binary, vaddr, process.mappings)
            if name == "spin_pie":
                assert address != vaddr  # relocated: the translation is exercised
            else:
                assert address == vaddr
            location = symbolize_one(symbolizer, process, address + 2)
            assert location.frames[0].function == function
            assert location.mapping is not None and location.mapping.path == str(binary)
            assert location.build_id == build_id_of(binary)


def test_names_functions_of_a_shared_library(c_binaries: Path) -> None:
    library = c_binaries / "libspin.so"
    with running([str(c_binaries / "uses_lib"), "60"], mapped=str(library)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer()
        for function in ("lib_inner", "lib_spin"):
            address = runtime_address(library, symbol_vaddr(library, function), process.mappings)
            location = symbolize_one(symbolizer, process, address + 1)
            assert location.frames[0].function == function
            assert location.mapping is not None and location.mapping.path == str(library)
            assert location.mapping.offset != 0  # the library's code is mapped at an offset
            assert location.build_id == build_id_of(library)


@pytest.mark.parametrize(
    ("program", "binary_name", "functions"),
    [
        ("spin_pie", "spin_pie", ("inner_spin", "outer_function", "main")),
        ("spin_nopie", "spin_nopie", ("inner_spin", "main")),
        ("uses_lib", "libspin.so", ("lib_inner", "lib_spin")),
    ],
)
def test_file_and_line_agree_with_addr2line(
    c_binaries: Path, program: str, binary_name: str, functions: tuple[str, ...]
) -> None:
    require_tool("addr2line")
    binary = c_binaries / binary_name
    with running([str(c_binaries / program), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer()
        assert symbolizer.prepare(process) >= 1  # DWARF indexed for the test binary
        compared = 0
        for function in functions:
            start, size = symbol_range(binary, function)
            for delta in range(0, size, -(-size // 5)):  # five points spread over the function
                address = runtime_address(binary, start + delta, process.mappings)
                location = symbolize_one(symbolizer, process, address)
                expected = addr2line(binary, start + delta)
                assert as_tuples(location) == expected, f"{function}+{delta}"
                assert location.frames[0].line > 0
                compared += 1
        assert compared >= 4 * len(functions)


def call_return_address(binary: Path, caller: str, callee: str) -> int:
    """The vaddr after `call callee` inside caller (x86-64 e8 rel32)."""
    (start, size), target = symbol_range(binary, caller), symbol_vaddr(binary, callee)
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".text")
        assert text is not None
        code = text.data()
        base = text["sh_addr"]
    for index in range(start - base, start - base + size - 4):
        if code[index] == 0xE8:
            rel = int.from_bytes(code[index + 1 : index + 5], "little", signed=True)
            if base + index + 5 + rel == target:
                return base + index + 5
    raise AssertionError(f"no call {callee} in {caller}")


def test_return_addresses_are_looked_up_one_byte_back(c_binaries: Path) -> None:
    binary = c_binaries / "spin_pie"
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer()
        inner = runtime_address(binary, symbol_vaddr(binary, "inner_spin"), process.mappings)
        ret_in_outer = runtime_address(
            binary, call_return_address(binary, "outer_function", "inner_spin"), process.mappings
        )
        ret_in_main = runtime_address(
            binary, call_return_address(binary, "main", "outer_function"), process.mappings
        )
        # outer_function begins where inner_spin ends: as a return address, its first
        # byte belongs to inner_spin (the call was the caller's last instruction).
        inner_vaddr, inner_size = symbol_range(binary, "inner_spin")
        assert inner_vaddr + inner_size == symbol_vaddr(binary, "outer_function")
        outer_start = runtime_address(
            binary, symbol_vaddr(binary, "outer_function"), process.mappings
        )
        stack = (inner + 3, ret_in_outer, ret_in_main, outer_start)
        locations = symbolizer.symbolize(process, stack, ())
        assert [loc.address for loc in locations] == list(stack)
        names = [loc.frames[0].function for loc in locations]
        assert names == ["inner_spin", "outer_function", "main", "inner_spin"]
        # As the first (interrupted) frame the same address is outer_function itself.
        assert symbolize_one(symbolizer, process, outer_start).frames[0].function == (
            "outer_function"
        )


def test_elf_names_first_then_lines_after_prepare(c_binaries: Path) -> None:
    binary = c_binaries / "spin_pie"
    with running([str(binary), "60"], mapped=str(binary)) as pid:
        process = capture(pid)
        symbolizer = Symbolizer()
        address = runtime_address(binary, symbol_vaddr(binary, "inner_spin") + 8, process.mappings)
        cheap = symbolize_one(symbolizer, process, address)
        assert cheap.frames[0].function == "inner_spin" and cheap.frames[0].line == 0
        assert symbolizer.pending() >= 1  # symbolize() queued the DWARF work
        assert symbolizer.prepare_pending() >= 1
        assert symbolizer.pending() == 0
        rich = symbolize_one(symbolizer, process, address)
        assert rich.frames[0].function == "inner_spin"
        assert rich.frames[0].file.endswith("spin.c") and rich.frames[0].line > 0


def test_vdso_frames_are_named() -> None:
    process = capture(os.getpid())
    vdso_mapping = next(m for m in process.mappings if m.path == "[vdso]")
    image = own_vdso()
    assert image is not None
    dynsym = ELFFile(io.BytesIO(image)).get_section_by_name(".dynsym")
    assert isinstance(dynsym, SymbolTableSection)
    value = next(s["st_value"] for s in dynsym.iter_symbols() if s.name == "__vdso_clock_gettime")
    location = symbolize_one(Symbolizer(), process, vdso_mapping.start + value + 4)
    assert location.frames[0].function in ("__vdso_clock_gettime", "clock_gettime")
    assert location.build_id


def test_kernel_frames_come_first() -> None:
    from agent.symbolize.kallsyms import Kallsyms

    kallsyms = Kallsyms.from_text("ffffffff81000000 T _stext\nffffffff81001000 T do_work\n")
    process = capture(os.getpid())
    exe_mapping = next(m for m in process.mappings if m.path == process.exe)
    locations = Symbolizer(kallsyms=kallsyms).symbolize(
        process, (exe_mapping.start + 16,), (0xFFFFFFFF81001010, 0xFFFFFFFF81001001)
    )
    assert [loc.kernel for loc in locations] == [True, True, False]
    assert [loc.frames[0].function for loc in locations[:2]] == ["do_work", "do_work"]
    assert locations[0].mapping is None and locations[2].mapping == exe_mapping
