"""Demangled names for people, raw symbols kept: Frame.system_name and pprof's
Function.system_name carry the mangled symbol, Function.name the demangled one."""

from __future__ import annotations

from pathlib import Path

from agent.model import Location, ProcessInfo, ProfileSample
from agent.pprof.builder import build_pprof, parse_pprof
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import DATA, compile_c, loader_mappings, runtime_address, symbol_vaddr

BASE = 0x7F4400000000
METHOD = "_ZNK6shapes6Circle4areaEd"


def at(symbolizer: Symbolizer, process: ProcessInfo, binary: Path, symbol: str) -> Location:
    address = runtime_address(binary, symbol_vaddr(binary, symbol) + 4, process.mappings)
    (location,) = symbolizer.symbolize(process, (address,), ())
    return location


def test_mangled_symbol_is_kept_beside_the_demangled_name(tmp_path: Path) -> None:
    binary = compile_c(
        [DATA / "names.cpp"], tmp_path / "names", "-O0", "-g", compiler=require_tool("g++")
    )
    process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, BASE))
    symbolizer = Symbolizer(cache_dir=tmp_path / "cache")
    elf_only = at(symbolizer, process, binary, METHOD).frames[0]
    assert symbolizer.prepare(process) == 1
    location = at(symbolizer, process, binary, METHOD)
    dwarf = location.frames[0]
    for frame in (elf_only, dwarf):
        assert frame.function == "shapes::Circle::area(double) const"
        assert frame.system_name == METHOD
    assert dwarf.line > 0
    plain = at(symbolizer, process, binary, "main").frames[0]
    assert (plain.function, plain.system_name) == ("main", "")  # nothing to keep

    profile = parse_pprof(build_pprof([ProfileSample((location,), 1)], 0, 10**9, 10**7))
    (function,) = profile.function
    assert profile.string_table[function.name] == "shapes::Circle::area(double) const"
    assert profile.string_table[function.system_name] == METHOD
    symbolizer.close()
