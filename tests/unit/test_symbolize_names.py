"""Source-level names: clone suffixes and the SymCache's outer name checked by ELF symbols."""

from __future__ import annotations

import pytest

from agent.elf.reader import SymbolTable
from agent.symbolize.dwarf import frame_of
from agent.symbolize.names import clone_base, outer_name


@pytest.mark.parametrize(
    ("raw", "base"),
    [
        ("_PyEval_EvalFrameDefault.cold", "_PyEval_EvalFrameDefault"),
        ("setxid_mark_thread.constprop.0", "setxid_mark_thread"),
        ("foo.isra.0.cold", "foo"),
        ("foo.part.3", "foo"),
        (
            "_ZN4core3fmt5write17h0123456789abcdefE.llvm.1234567",
            "_ZN4core3fmt5write17h0123456789abcdefE",
        ),
        ("foo.localalias", "foo"),
        ("plain", "plain"),
        (".cold", ".cold"),  # nothing left: keep what there is
        ("version.2", "version.2"),  # not a clone suffix
    ],
)
def test_clone_suffixes_are_dropped(raw: str, base: str) -> None:
    assert clone_base(raw) == base


def test_a_neighbours_cold_label_is_not_the_function() -> None:
    # pyenv's libpython3.11: `ast2obj_expr.cold` (size 0) shares its address with
    # `_PyEval_EvalFrameDefault.cold`; symbolic names the whole function after it.
    symbols = SymbolTable(
        [
            (0xFA7F6, 0, "ast2obj_expr.cold", False),
            (0xFA7F6, 4, "_PyEval_EvalFrameDefault.cold", False),
            (0xFAB70, 43345, "_PyEval_EvalFrameDefault", True),
        ]
    )
    hot, cold = 0xFAB70 + 100, 0xFA7F7
    assert outer_name("ast2obj_expr.cold", symbols.covering(hot)) == "_PyEval_EvalFrameDefault"
    fixed = outer_name("ast2obj_expr.cold", symbols.covering(cold))
    assert frame_of(fixed, "", 0).function == "_PyEval_EvalFrameDefault"
    assert frame_of(fixed, "", 0).system_name == "_PyEval_EvalFrameDefault.cold"


def test_the_dwarf_name_of_an_alias_stands() -> None:
    symbols = SymbolTable([(0x1000, 64, "newlocale", True), (0x1000, 64, "__newlocale", True)])
    assert set(symbols.covering(0x1010)) == {"newlocale", "__newlocale"}
    assert outer_name("__newlocale", symbols.covering(0x1010)) == "__newlocale"
    assert outer_name("foo.isra.0", SymbolTable([(0x1000, 8, "foo", False)]).covering(0x1004)) == (
        "foo.isra.0"
    )


def test_without_a_covering_symbol_the_indexed_name_stands() -> None:
    symbols = SymbolTable([(0x1000, 8, "tiny", False)])
    assert symbols.covering(0x1008) == ()  # past its end: a gap
    assert outer_name("static_helper", symbols.covering(0x1008)) == "static_helper"


def test_rust_llvm_suffixes_demangle() -> None:
    frame = frame_of("_ZN4core3fmt5write17h0123456789abcdefE.llvm.1234567", "", 0)
    assert frame.function == "core::fmt::write"
    assert frame.system_name.endswith(".llvm.1234567")
