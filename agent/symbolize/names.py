"""Source-level function names from what symbol tables and SymCaches say.

Compilers split and clone functions and name the pieces after the source function
with a suffix: GCC's `foo.cold` (the unlikely part of foo), `.part.N`, `.isra.N`,
`.constprop.N`, `.lto_priv.N`, `.localalias`; LLVM's `.llvm.<digits>` (ThinLTO
promotion, common in Rust). addr2line, reading DWARF, names all of these `foo`;
Strobe shows that name and keeps the raw symbol as Function.system_name.

symbolic's SymCache names a function after the ELF symbol at its lowest address.
For a hot/cold split function that is the `.cold` fragment, whose address another
function's zero-size `.cold` label may share: in pyenv's CPython 3.11 every address
of `_PyEval_EvalFrameDefault` comes back as `ast2obj_expr.cold`. `outer_name` checks
the SymCache's name of the outermost (real) function against the symbols whose
range covers the address, and takes theirs when it names another function.
"""

from __future__ import annotations

import re

_CLONE_SUFFIX = re.compile(
    r"(\.(cold|part|isra|constprop|lto_priv|localalias|llvm|clone|specialized)(\.\d+)*)+$"
)


def clone_base(symbol: str) -> str:
    """The symbol without compiler clone suffixes (`foo.isra.0.cold` -> `foo`)."""
    base = _CLONE_SUFFIX.sub("", symbol)
    return base or symbol


def outer_name(indexed: str, covering: tuple[str, ...]) -> str:
    """The raw name of the real function at an address.

    `indexed` is the SymCache's outermost name there; `covering` the names of the
    sized ELF symbols whose range holds the address (aliases of one function).
    The SymCache's name stands when it is one of them (up to clone suffixes): DWARF
    then tells which alias the source used (`__newlocale`, not `newlocale`).
    """
    if not covering:
        return indexed
    base = clone_base(indexed)
    if any(clone_base(name) == base for name in covering):
        return indexed
    return covering[0]
