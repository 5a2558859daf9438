"""Symbol names a binary can carry, from demangling to the profile: any bytes, legacy Rust
`$u<hex>$` escapes of any value, names that are not UTF-8."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import example, given
from hypothesis import strategies as st

from agent.model import Mapping, ProcessInfo, ProfileSample
from agent.pprof import build_pprof, parse_pprof
from agent.render.flamegraph import render_flamegraph
from agent.symbolize.demangle import demangle
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.fuzz import any_text, fuzz_settings

HEX = "0123456789abcdef"
# A legacy Rust component: text with $u<hex>$ escapes (2-6 hex digits, any value).
RUST_PIECE = st.one_of(
    st.text("abcxyz_", min_size=1, max_size=4),
    st.text(HEX, min_size=2, max_size=6).map(lambda code: f"$u{code}$"),
    st.sampled_from(["$LT$", "$GT$", "$C$", "$u20$", "$u110000$", "$ud800$", "$udfff$", ".."]),
)
RUST_COMPONENT = st.lists(RUST_PIECE, min_size=1, max_size=4).map("".join)


def legacy_rust(components: list[str], hash_hex: str) -> str:
    body = "".join(f"{len(c)}{c}" for c in [*components, "h" + hash_hex])
    return f"_ZN{body}E"


def is_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udfff"


@fuzz_settings(400)
@given(st.one_of(any_text, any_text.map(lambda name: "_Z" + name)))
@example("_ZN3foo9$u110000$17h0123456789abcdefE")
def test_demangle_any_name(name: str) -> None:
    assert isinstance(demangle(name), str)


@fuzz_settings(300)
@given(st.lists(RUST_COMPONENT, min_size=1, max_size=3), st.text(HEX, min_size=16, max_size=16))
@example(["foo", "$u110000$"], "0123456789abcdef")
@example(["foo", "$ud800$"], "0123456789abcdef")
def test_legacy_rust_escapes_of_any_value(components: list[str], hash_hex: str) -> None:
    """An escape naming no character stays as written; it never raises or makes surrogates."""
    mangled = legacy_rust(components, hash_hex)
    readable = demangle(mangled)
    assert readable != mangled and hash_hex not in readable  # demangled, hash dropped
    assert not any(is_surrogate(c) for c in readable)


NASTY_C = r"""
void a(void) __asm__("_ZN3foo9$u110000$17h0123456789abcdefE");
void a(void) { }
void b(void) __asm__("_ZN3foo7$ud800$17h0123456789abcdefE");
void b(void) { }
void c(void) __asm__("bad\377\376name");
void c(void) { }
int main(void) { a(); b(); c(); return 0; }
"""
NASTY_SYMBOLS = {
    b"_ZN3foo9$u110000$17h0123456789abcdefE": "foo::$u110000$",
    b"_ZN3foo7$ud800$17h0123456789abcdefE": "foo::$ud800$",
    b"bad\xff\xfename": "bad\udcff\udcfename",
}


def file_offsets(path: Path, names: list[bytes]) -> dict[bytes, int]:
    """File offset of each named function (independent of the reader under test)."""
    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        loads = [s.header for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        strings = elf.get_section(symtab["sh_link"]).data()
        offsets = {}
        for symbol in symtab.iter_symbols():
            start = symbol["st_name"]
            raw = strings[start : strings.index(b"\0", start)]
            if raw in names:
                vaddr = symbol["st_value"]
                load = next(h for h in loads if h.p_vaddr <= vaddr < h.p_vaddr + h.p_filesz)
                offsets[raw] = vaddr - load.p_vaddr + load.p_offset
    return offsets


def test_nasty_symbol_names_reach_the_profile(tmp_path: Path) -> None:
    """A binary whose symbols demangle to nothing valid or are not UTF-8: the symbolizer
    names them, and the pprof profile and the flame graph carry them."""
    gcc = require_tool("gcc")
    source, binary = tmp_path / "names.c", tmp_path / "names"
    source.write_text(NASTY_C)
    subprocess.run([gcc, "-O0", "-o", str(binary), str(source)], check=True)
    offsets = file_offsets(binary, list(NASTY_SYMBOLS))
    assert sorted(offsets) == sorted(NASTY_SYMBOLS)

    base, st_ = 0x7F3400000000, os.stat(binary)
    dev = f"{os.major(st_.st_dev):02x}:{os.minor(st_.st_dev):02x}"
    mapping = Mapping(base, base + 0x100000, 0, str(binary), dev, st_.st_ino, "r-xp")
    process = ProcessInfo(0, 0, "names", str(binary), (mapping,))
    # +1: inside each function, also for the callers, looked up at return address - 1
    stack = tuple(base + offsets[name] + 1 for name in NASTY_SYMBOLS)
    locations = Symbolizer().symbolize(process, stack, ())
    assert [loc.frames[0].function for loc in locations] == list(NASTY_SYMBOLS.values())

    samples = [ProfileSample(locations, 3, (("comm", "names\udcff"),), pid=1)]
    profile = parse_pprof(build_pprof(samples, 0, 10**9, 10**7))
    names = {profile.string_table[f.name] for f in profile.function}
    assert names == {"foo::$u110000$", "foo::$ud800$", "bad\ufffd\ufffdname"}
    assert "names\ufffd" in profile.string_table
    svg = render_flamegraph(samples)
    ET.fromstring(svg.encode("utf-8"))
    assert "bad\ufffd\ufffdname" in svg


@pytest.mark.parametrize("name", ["_ZN3foo9$u110000$17h0123456789abcdefE"])
def test_out_of_range_escape_is_kept_verbatim(name: str) -> None:
    assert demangle(name) == "foo::$u110000$"
