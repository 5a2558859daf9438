"""DWARF frames (inlined calls, C++ names) and demangling, compared with binutils.

The binaries here are not run: their mappings are laid out as ld.so would
(tests/symbolize/helpers.loader_mappings) for a process with pid 0, which makes the
symbolizer open the file by its host path.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.model import Location, ProcessInfo
from agent.symbolize.demangle import demangle
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import (
    DATA,
    addr2line,
    compile_c,
    loader_mappings,
    runtime_address,
    symbol_range,
)

BASE = 0x7F1200000000


def loaded(binary: Path) -> ProcessInfo:
    return ProcessInfo(
        pid=0, start_time=0, comm="t", exe=str(binary), mappings=loader_mappings(binary, BASE)
    )


def at(symbolizer: Symbolizer, process: ProcessInfo, binary: Path, vaddr: int) -> Location:
    (location,) = symbolizer.symbolize(
        process, (runtime_address(binary, vaddr, process.mappings),), ()
    )
    return location


def frames_of(location: Location) -> list[tuple[str, str, int]]:
    return [(f.function, f.file, f.line) for f in location.frames]


def test_inlined_frames_match_addr2line(tmp_path: Path) -> None:
    require_tool("addr2line")
    binary = compile_c(
        [DATA / "inline.c"], tmp_path / "inline", "-O2", "-g", compiler=require_tool("gcc")
    )
    process = loaded(binary)
    symbolizer = Symbolizer()
    assert symbolizer.prepare(process) == 1
    start, size = symbol_range(binary, "top")
    deepest = 0
    for vaddr in range(start, start + size):
        location = at(symbolizer, process, binary, vaddr)
        assert frames_of(location) == addr2line(binary, vaddr), hex(vaddr)
        deepest = max(deepest, len(location.frames))
    assert deepest == 3  # leaf inlined into middle inlined into top, innermost first
    innermost = at(symbolizer, process, binary, start)
    assert [f.function for f in innermost.frames][-1] == "top"


def test_cxx_names_are_demangled_before_and_after_dwarf(tmp_path: Path) -> None:
    require_tool("addr2line")
    binary = compile_c(
        [DATA / "names.cpp"], tmp_path / "names", "-O0", "-g", compiler=require_tool("g++")
    )
    process = loaded(binary)
    symbolizer = Symbolizer()
    method, _ = symbol_range(binary, "_ZNK6shapes6Circle4areaEd")
    template, _ = symbol_range(binary, "_ZN6shapes5twiceIiEET_S1_")
    elf_only = at(symbolizer, process, binary, method + 4)
    assert elf_only.frames[0].function == "shapes::Circle::area(double) const"
    assert at(symbolizer, process, binary, template + 4).frames[0].function == (
        "int shapes::twice<int>(int)"
    )
    assert symbolizer.prepare(process) == 1
    for vaddr in (method + 4, template + 4):
        location = at(symbolizer, process, binary, vaddr)
        assert frames_of(location) == addr2line(binary, vaddr, demangle=True)


def test_binary_without_dwarf_falls_back_to_elf_symbols(tmp_path: Path) -> None:
    binary = compile_c([DATA / "inline.c"], tmp_path / "plain", "-O2", compiler=require_tool("gcc"))
    process = loaded(binary)
    symbolizer = Symbolizer()
    assert symbolizer.prepare(process) == 0  # nothing to index
    start, _ = symbol_range(binary, "top")
    location = at(symbolizer, process, binary, start + 2)
    assert frames_of(location) == [("top", "", 0)]


@pytest.mark.parametrize(
    "mangled",
    [
        "_ZN2ns1K4methEi",
        "_ZNSt6vectorIiSaIiEE9push_backERKi",
        "_ZNK6shapes6Circle4areaEd",
        "_ZSt4endlIcSt11char_traitsIcEERSt13basic_ostreamIT_T0_ES6_",
    ],
)
def test_cxx_demangling_matches_cxxfilt(mangled: str) -> None:
    cxxfilt = require_tool("c++filt")
    expected = subprocess.run(
        [cxxfilt, mangled], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert expected != mangled
    assert demangle(mangled) == expected


@pytest.mark.parametrize(
    ("mangled", "expected"),
    [
        # Legacy Rust mangling (examples from rustc-demangle's test suite).
        ("_ZN4testE", "test"),
        ("_ZN3foo3barE", "foo::bar"),
        ("_ZN4core3fmt9Arguments6new_v117h1d3b8a4b2f1c5e6aE", "core::fmt::Arguments::new_v1"),
        (
            "_ZN71_$LT$Test$u20$$u2b$$u20$$u27$static$u20$as$u20$foo..Bar$LT$Test$GT$$GT$"
            "3bar17h930b740aa94f1d3aE",
            "<Test + 'static as foo::Bar<Test>>::bar",
        ),
        # Not mangled, or not understood: unchanged.
        ("main", "main"),
        ("_Znot_really", "_Znot_really"),
        ("", ""),
    ],
)
def test_rust_and_plain_names(mangled: str, expected: str) -> None:
    assert demangle(mangled) == expected
