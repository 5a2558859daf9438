"""Demangle C++ (Itanium), legacy Rust and Rust v0 symbol names.

Uses libstdc++'s own __cxa_demangle through ctypes (present wherever g++ or any C++
program is installed) rather than a new dependency. Legacy Rust names are Itanium
names with `$..$` escapes and a `::h<hash>` suffix, which are cleaned afterwards.
Rust v0 names (`_R...`) go to the pure-Python parser in rust_v0.py, which prints what
GNU `c++filt` prints less what changes from build to build: crate disambiguators
(`mycrate[3c1c0]::foo` is `mycrate::foo`, as `::h<hash>` goes from legacy names) and,
with them, the `: usize` type suffix of const generic values (`Buf<4>`), i.e. libiberty's
and rustc-demangle's non-verbose form. The raw symbol stays with the caller
(Function.system_name), so nothing is lost for tools that want the full form.
Anything that is not mangled, or that fails to demangle, comes back unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import re
from typing import Any

from agent.symbolize.rust_v0 import demangle_v0

_RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")
_RUST_ESCAPES = {
    "$SP$": "@",
    "$BP$": "*",
    "$RF$": "&",
    "$LT$": "<",
    "$GT$": ">",
    "$LP$": "(",
    "$RP$": ")",
    "$C$": ",",
}
_RUST_UNICODE = re.compile(r"\$u([0-9a-f]{2,6})\$")
_RUST_LEADING_UNDERSCORE = re.compile(r"(^|::)_\$")
_LEGACY_RUST = re.compile(r"^_ZN.*17h[0-9a-f]{16}E$")


def _load_cxa_demangle() -> Any:
    try:
        libstdcxx = ctypes.CDLL("libstdc++.so.6")
    except OSError:
        return None
    function = libstdcxx.__cxa_demangle
    function.restype = ctypes.c_void_p  # a malloc'd char*, freed below
    function.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int),
    ]
    return function


_CXA_DEMANGLE = _load_cxa_demangle()
_LIBC_FREE = ctypes.CDLL(None).free
_LIBC_FREE.argtypes = [ctypes.c_void_p]
_LIBC_FREE.restype = None


def _itanium(name: str) -> str | None:
    if _CXA_DEMANGLE is None:
        return None
    status = ctypes.c_int(0)
    result = _CXA_DEMANGLE(name.encode("utf-8", "surrogateescape"), None, None, status)
    if not result:
        return None
    try:
        text = ctypes.string_at(result)
    finally:
        _LIBC_FREE(result)
    return text.decode("utf-8", "replace") if status.value == 0 else None


def _clean_legacy_rust(name: str) -> str:
    name = _RUST_HASH.sub("", name)
    name = _RUST_LEADING_UNDERSCORE.sub(r"\1$", name)  # "_$LT$" opens a component as "<"
    for escape, text in _RUST_ESCAPES.items():
        name = name.replace(escape, text)
    name = _RUST_UNICODE.sub(_rust_char, name)
    return name.replace("..", "::")


def _rust_char(match: re.Match[str]) -> str:
    """The character a `$u<hex>$` escape names; the escape itself when it names none."""
    code = int(match.group(1), 16)
    if code >= 0x110000 or 0xD800 <= code <= 0xDFFF:  # chr() refuses or makes a surrogate
        return match.group(0)
    return chr(code)


@functools.lru_cache(maxsize=65536)
def demangle(name: str) -> str:
    """Readable form of a mangled symbol; unchanged if not mangled or not understood."""
    if not name.startswith(("_Z", "_R")):
        return name
    # Strip a symbol-version suffix ("@GLIBCXX_3.4"); Itanium clone suffixes survive
    # as-is, a Rust v0 `.llvm.<hash>`-style suffix is dropped (as c++filt does).
    base, at, version = name.partition("@")
    readable = demangle_v0(base) if base.startswith("_R") else _itanium(base)
    if readable is None:
        return name
    if _LEGACY_RUST.match(base):
        readable = _clean_legacy_rust(readable)
    return readable + (at + version if at else "")
