"""Rust v0 demangling (`_R...`): every v0 symbol of a real rustc build against GNU c++filt,
hand-written names from the mangling spec, and hostile input that must stay cheap."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import given
from hypothesis import strategies as st

from agent.symbolize import rust_v0
from agent.symbolize.demangle import demangle
from agent.symbolize.rust_v0 import demangle_v0
from tests.conftest import REPO, require_tool
from tests.fuzz import fuzz_settings

SOURCE = REPO / "tests" / "data" / "rust" / "v0.rs"

# c++filt prints libiberty's verbose form; demangle() leaves out what the module docstring
# says: crate disambiguators ("core[c1f1a4ba060b9bfa]") and const value types (": usize").
CRATE_HASH = re.compile(r"(?<=\w)\[[0-9a-f]+\]")
CONST_TYPE = re.compile(r": (?:[iu](?:8|16|32|64|128|size)|bool|char)(?=[,>\]])")
# libiberty prints a const wider than 64 bits one character late: the hex digits less the
# first, then the `_` that ends them. demangle_v0 prints them all; the test applies the
# same slip to its output before comparing (and checks the right digits separately).
WIDE_CONST = re.compile(r"0x[0-9a-f]([0-9a-f]{16,})(?![0-9a-f])")


def libiberty_wide_const_slip(text: str) -> str:
    return WIDE_CONST.sub(r"0x\1_", text)


def non_verbose(cxxfilt_output: str) -> str:
    return CONST_TYPE.sub("", CRATE_HASH.sub("", cxxfilt_output))


def find_rustc() -> str:
    """rustc from PATH or rustup's ~/.cargo/bin; in CI its absence fails (require_tool)."""
    for candidate in (shutil.which("rustc"), Path.home() / ".cargo" / "bin" / "rustc"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return require_tool("rustc")


def v0_symbols(binary: Path) -> list[str]:
    with open(binary, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        names = {symbol.name for symbol in symtab.iter_symbols()}
    return sorted(name for name in names if name.startswith("_R"))


def cxxfilt(names: list[str]) -> list[str]:
    filt = require_tool("c++filt")
    text = "".join(name + "\n" for name in names)
    output = subprocess.run([filt], input=text, capture_output=True, text=True, check=True)
    lines = output.stdout.splitlines()
    assert len(lines) == len(names)
    return lines


@pytest.fixture(scope="module")
def rust_symbols(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every v0 symbol of tests/data/rust/v0.rs built by rustc, with c++filt's reading."""
    rustc = find_rustc()
    binary = tmp_path_factory.mktemp("rust") / "v0"
    flags = ["-C", "symbol-mangling-version=v0", "-C", "opt-level=0", "--crate-type", "bin"]
    subprocess.run([rustc, *flags, "-o", str(binary), str(SOURCE)], check=True)
    names = v0_symbols(binary)
    return dict(zip(names, cxxfilt(names), strict=True))


def test_rustc_build_has_hundreds_of_v0_symbols(rust_symbols: dict[str, str]) -> None:
    # Debian 12's rustc 1.63 makes ~950 (std prebuilt with legacy names), rustup's 1.95 ~1000.
    assert len(rust_symbols) >= 500
    unread = [name for name, readable in rust_symbols.items() if readable == name]
    assert unread == []  # c++filt reads them all, so each one below is a real comparison


def test_every_symbol_matches_cxxfilt(rust_symbols: dict[str, str]) -> None:
    """Verbose output is c++filt's, character for character."""
    mismatches = {
        name: (expected, demangle_v0(name, verbose=True))
        for name, expected in rust_symbols.items()
        if libiberty_wide_const_slip(demangle_v0(name, verbose=True) or name) != expected
    }
    assert mismatches == {}


def test_demangle_matches_cxxfilt_without_crate_hashes(rust_symbols: dict[str, str]) -> None:
    mismatches = {
        name: (non_verbose(expected), demangle(name))
        for name, expected in rust_symbols.items()
        if libiberty_wide_const_slip(demangle(name)) != non_verbose(expected)
    }
    assert mismatches == {}
    assert not any(CRATE_HASH.search(demangle(name)) for name in rust_symbols)


def test_rustc_build_covers_the_grammar(rust_symbols: dict[str, str]) -> None:
    """The program puts each construct into the symbol table, readable as written."""
    readable = {demangle(name) for name in rust_symbols}
    expected = {
        "v0::grüße::größe",  # punycode with an ASCII part
        "v0::grüße::日本語",  # punycode without one
        "<v0::grüße::Straße<7>>::länge",  # inherent impl, const generic
        "<v0::Circle as v0::Shape>::area",  # trait impl
        "<dyn v0::Shape>::doubled",  # inherent impl on a trait object
        "v0::outer::through::<v0::main::{closure#0}>",  # closure
        "v0::flag::<true>",
        "v0::letter::<'z'>",
        "v0::letter::<'\\n'>",
        "v0::signed::<-5>",
        "v0::signed::<-2147483648>",
        "v0::tiny::<-128>",
        "v0::wide::<0xffffffffffffffffffffffffffffffff>",  # u128::MAX, in hex
        "v0::call_ptr::<for<'a> fn(&'a u8) -> u8>",
        'v0::call_ptr::<extern "C" fn(i32) -> i32>',
        "v0::call_ptr::<unsafe fn(*const u8) -> u8>",
        "v0::raw::<u8>",
        "<v0::Buffer<i64, 4>>::new",
        "<v0::Buffer<(u8, bool), 2>>::first",
        "<v0::outer::inner::Wrapper<str>>::len",
        "<v0::outer::inner::Wrapper<[u8]>>::len",
    }
    assert expected - readable == set()
    joined = "\n".join(readable)
    for fragment in (
        "{shim:vtable#0}",
        "dyn core::iter::traits::iterator::Iterator<Item = u32>",  # associated type binding
        "dyn for<'a> core::ops::function::Fn<(&'a u8,), Output = u8> + core::marker::Send",
        "; 3]>",  # array type
    ):
        assert fragment in joined


def test_truncated_and_altered_real_symbols_are_unchanged_or_agree(
    rust_symbols: dict[str, str],
) -> None:
    """Prefixes and one-character changes of real symbols: whatever demangles agrees with
    c++filt (which accepts more malformed input: forward backreferences, wrapped numbers)."""
    names = sorted(rust_symbols)[::10]
    alphabet = "_0123456789azAZBEIKNCL"
    cases = sorted(
        {name[:end] for name in names for end in range(3, len(name), 3)}
        | {
            name[:i] + alphabet[i % len(alphabet)] + name[i + 1 :]
            for name in names
            for i in (5, 17)
        }
    )
    disagreements = {}
    for case, expected in zip(cases, cxxfilt(cases), strict=True):
        ours = demangle_v0(case, verbose=True)
        if ours is None:
            assert demangle(case) == case
        elif libiberty_wide_const_slip(ours) != expected:
            disagreements[case] = (expected, ours)
    assert disagreements == {}
    assert len(cases) > 1000


# --- Hand-written names (the spec's grammar; no rustc needed) -------------------------

SPEC_EXAMPLES = [
    ("_RNvNtCs1234_7mycrate3foo3bar", "mycrate[3c1c0]::foo::bar", "mycrate::foo::bar"),
    (
        "_RNvMsr_NtCs3ssYzQotkvD_3std4pathNtB5_7PathBuf3newCs15kBYyAo9fc_7mycrate",
        "<std[284a76a8b41a7fd3]::path::PathBuf>::new",
        "<std::path::PathBuf>::new",
    ),
    (
        "_RNvXCs1234_7mycrateNtB2_6StructNtB2_5Trait3foo",
        "<mycrate[3c1c0]::Struct as mycrate[3c1c0]::Trait>::foo",
        "<mycrate::Struct as mycrate::Trait>::foo",
    ),
    ("_RNvC6_123foo3bar", "123foo[0]::bar", "123foo::bar"),
    (
        "_RNCNCNgCs6DXkGYLi8lr_2cc5spawn00B5_",
        "cc[4d6468d6c9fd4bb3]::spawn::{closure#0}::{closure#0}",
        "cc::spawn::{closure#0}::{closure#0}",
    ),
    ("_RNCNvC1a1fs_0", "a[0]::f::{closure#1}", "a::f::{closure#1}"),
    ("_RNSNvC1a1f6vtable", "a[0]::f::{shim:vtable#0}", "a::f::{shim:vtable#0}"),
    ("_RNXNvC1a1f0", "a[0]::f::{X#0}", "a::f::{X#0}"),
    (
        "_RNqCs4fqI2P2rA04_11utf8_identsu30____7hkackfecea1cbdathfdh9hlq6y",
        "utf8_idents[317d481089b8c8fe]::საჭმელად_გემრიელი_სადილი",
        "utf8_idents::საჭმელად_გემრიელი_სადილი",
    ),
    ("_RNvC1au6a1_yka", "a[0]::a1ü", "a::a1ü"),
    (
        "_RINbNbCskIICzLVDPPb_5alloc5alloc8box_freeDINbNiB4_5boxed5FnBoxuEp6OutputuEL_E"
        "Cs1iopQbuBiw2_3std",
        "alloc[f15a878b47eb696b]::alloc::box_free::<dyn alloc[f15a878b47eb696b]::boxed::"
        "FnBox<(), Output = ()>>",
        "alloc::alloc::box_free::<dyn alloc::boxed::FnBox<(), Output = ()>>",
    ),
    (
        "_RMC0INtC8arrayvec8ArrayVechKj7b_E",
        "<arrayvec[0]::ArrayVec<u8, 123: usize>>",
        "<arrayvec::ArrayVec<u8, 123>>",
    ),
    (
        "_RINvNtC3std3mem8align_ofjE",
        "std[0]::mem::align_of::<usize>",
        "std::mem::align_of::<usize>",
    ),
    (
        "_RINvNtC3std3mem8align_ofFUKCRL_hvEuE",
        'std[0]::mem::align_of::<unsafe extern "C" fn(&u8, ...)>',
        'std::mem::align_of::<unsafe extern "C" fn(&u8, ...)>',
    ),
    (
        "_RINvNtC3std3mem8align_ofFG_RL0_hEuE",
        "std[0]::mem::align_of::<for<'a> fn(&'a u8)>",
        "std::mem::align_of::<for<'a> fn(&'a u8)>",
    ),
    (
        "_RINvC1a1fFK8C_unwindEuE",
        'a[0]::f::<extern "C-unwind" fn()>',
        'a::f::<extern "C-unwind" fn()>',
    ),
    ("_RINvC1a1fANtC1b1cj3_E", "a[0]::f::<[b[0]::c; 3: usize]>", "a::f::<[b::c; 3]>"),
    ("_RINvC1a1fSRL_eE", "a[0]::f::<[&str]>", "a::f::<[&str]>"),
    ("_RINvC1a1fTEThETlmEE", "a[0]::f::<(), (u8,), (i32, u32)>", "a::f::<(), (u8,), (i32, u32)>"),
    (
        "_RINvC1a1fPhOuzpE",
        "a[0]::f::<*const u8, *mut (), !, _>",
        "a::f::<*const u8, *mut (), !, _>",
    ),
    (
        "_RINvC1a1fQL_DNtC3std4SendEL_E",
        "a[0]::f::<&mut dyn std[0]::Send>",
        "a::f::<&mut dyn std::Send>",
    ),
    (
        "_RINvC1a1fRDG_INtC3std2FnTRL0_hEEp6OutputhEL_E",
        "a[0]::f::<&dyn for<'a> std[0]::Fn<(&'a u8,), Output = u8>>",
        "a::f::<&dyn for<'a> std::Fn<(&'a u8,), Output = u8>>",
    ),
    (
        "_RINvC1a1fKc27_Kc5c_Kc20_Kc7e_Kc0_Kc1f600_E",
        "a[0]::f::<''': char, '\\': char, '\\u{20}': char, '\\u{7e}': char, '\\u{0}': char, "
        "'\\u{1f600}': char>",
        "a::f::<''', '\\', '\\u{20}', '\\u{7e}', '\\u{0}', '\\u{1f600}'>",
    ),
    (
        "_RINvC1a1fKpKb0_Kanff_Kyffffffffffffffff_E",
        "a[0]::f::<_, false: bool, -255: i8, 18446744073709551615: u64>",
        "a::f::<_, false, -255, 18446744073709551615>",
    ),
    # Suffixes: `.llvm.<hash>` and the like go (as in c++filt), a symbol version stays.
    ("_RNvC7mycrate3foo.llvm.123456", "mycrate[0]::foo", "mycrate::foo"),
    ("_RNvC7mycrate3foo.cold", "mycrate[0]::foo", "mycrate::foo"),
]


@pytest.mark.parametrize(("mangled", "verbose", "readable"), SPEC_EXAMPLES)
def test_spec_examples(mangled: str, verbose: str, readable: str) -> None:
    assert demangle_v0(mangled, verbose=True) == verbose
    assert demangle(mangled) == readable


def test_spec_examples_agree_with_cxxfilt() -> None:
    names = [mangled for mangled, _, _ in SPEC_EXAMPLES]
    assert cxxfilt(names) == [verbose for _, verbose, _ in SPEC_EXAMPLES]


def test_wide_const_prints_every_hex_digit() -> None:
    # i128 0x10000000000000000; libiberty (c++filt) prints "0x0000000000000000_" here.
    assert demangle("_RINvC1a1fKn10000000000000000_E") == "a::f::<0x10000000000000000>"
    assert demangle("_RINvC1a1fKnn10000000000000000_E") == "a::f::<-0x10000000000000000>"


def test_symbol_version_is_kept_and_other_names_untouched() -> None:
    assert demangle("_RNvC7mycrate3foo@VERS_1") == "mycrate::foo@VERS_1"
    for name in ("_R", "_Rfoo", "_R0NvC1a1f", "_RNvC1a1f_", "_RNvC1a1fé", "R_NvC1a1f", "_RNvC1a"):
        assert demangle(name) == name


# --- Hostile input -----------------------------------------------------------------------


def base62_backref(target: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    if target == 0:
        return "B_"
    value, text = target - 1, ""
    while True:
        value, digit = divmod(value, 62)
        text = digits[digit] + text
        if not value:
            return f"B{text}_"


def doubling_backrefs(levels: int) -> str:
    """Generic args each a pair of the one before: the output doubles per level."""
    body = "INvC1a1fh"
    previous = len(body) - 1  # the `h` (u8)
    for _ in range(levels):
        start = len(body)
        body += "T" + base62_backref(previous) * 2 + "E"
        previous = start
    return "_R" + body + "E"


def backref_chain(length: int) -> str:
    """Generic args each a backreference to the one before: following one takes n hops."""
    body = "INvC1a1fh"
    previous = len(body) - 1
    for _ in range(length):
        start = len(body)
        body += base62_backref(previous)
        previous = start
    return "_R" + body + "E"


# Shapes of input whose cost grows with n: each is well formed at n=5 (checked below),
# so at n=5000 it is the bound that stops it, not a slip in how it was built.
SCALING = {
    "nested paths": lambda n: "_R" + "Nv" * n + "C1a" + "1b" * n,
    "nested types": lambda n: "_RINvC1a1f" + "R" * n + "hE",
    "nested generics": lambda n: "_R" + "INvC1a1f" * n + "h" + "E" * n,
    "backref chain": backref_chain,
    "doubling backrefs": lambda n: doubling_backrefs(min(n, 60)),
    "tuple of many": lambda n: "_RINvC1a1fT" + "h" * n * 10 + "EE",
}


@pytest.mark.parametrize("build", SCALING.values(), ids=SCALING.keys())
def test_growing_input_is_bounded(build: Callable[[int], str]) -> None:
    assert demangle(build(5)) != build(5)
    name = build(5000)
    start = time.perf_counter()
    assert demangle_v0(name) is None
    assert demangle(name) == name
    assert time.perf_counter() - start < 2.0  # bounded work; milliseconds on an idle machine


HOSTILE = {
    "huge backref": "_RNvB" + "z" * 500 + "_3foo",
    "backref to itself": "_RNvB1_3foo",
    "forward backref": "_RINvC1a1fBz_hE",
    "huge identifier length": "_RNvC" + "9" * 50 + "a",
    "identifier past the end": "_RNvC1a100foo",
    "huge punycode delta": "_RNvC1au40_" + "9" * 40,
    "bad punycode digit": "_RNvC1au5a_bCd",
    "truncated punycode": "_RNvC1au3_a_9",
    "huge lifetime binder": "_RINvC1a1fFG" + "z" * 10 + "_uEuE",
    "unbound lifetime": "_RINvC1a1fFRL5_hEuE",
    "huge char const": "_RINvC1a1fKc" + "f" * 30 + "_E",
    "bool const not 0 or 1": "_RINvC1a1fKb2_E",
    "too long": "_RNvC1a20000" + "x" * 20000,
    "not ascii": "_RNvC1a3fé",
    "only prefix": "_R",
}


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_is_cheap_and_unchanged(name: str) -> None:
    start = time.perf_counter()
    assert demangle_v0(name) is None
    assert demangle_v0(name, verbose=True) is None
    assert demangle(name) == name
    assert time.perf_counter() - start < 2.0


def test_every_prefix_of_a_symbol_is_unchanged() -> None:
    name = "_RINvNtC3std3mem8align_ofFG_RL0_hEuE"
    for end in range(len(name)):
        assert demangle(name[:end]) == name[:end]


def test_bounds_leave_room_for_real_symbols() -> None:
    """The limits sit far above what real symbols need (measured on the rustc build: depth
    30, 222 steps, 932 characters in, 1697 out), and deep nesting stays under Python's
    recursion limit with room for the caller's frames."""
    assert rust_v0.MAX_DEPTH * 3 < 1000 - 300
    nested = "_R" + "INvC1a1f" * 40 + "h" + "E" * 40
    assert demangle(nested) == "a::f::<" + "a::f<" * 39 + "u8" + ">" * 40


# Characters of the v0 grammar, weighted to its tags, so that random names get deep.
GRAMMAR = st.text("NvCIEBKLRQPOASTFDGUMXYuhjp_0123456789abcs", max_size=80)


@fuzz_settings(500)
@given(GRAMMAR)
def test_any_v0_like_name_demangles_or_comes_back(body: str) -> None:
    name = "_R" + body
    readable = demangle(name)
    assert readable == name or readable == demangle_v0(name)
