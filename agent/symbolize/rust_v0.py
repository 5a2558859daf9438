"""Demangle Rust v0 symbol names (`_R...`), in pure Python.

Follows the v0 grammar (rustc's symbol-mangling documentation) and prints what
libiberty's Rust demangler prints, the one GNU `c++filt` uses:

- `verbose=True` is `c++filt`'s own output: crate roots carry their disambiguator
  (`mycrate[3c1c0]::foo`) and const generic values their type (`Buf<4: usize>`).
- `verbose=False` (what `demangle.demangle` uses) leaves both out: `mycrate::foo`,
  `Buf<4>`, as libiberty does without DMGL_VERBOSE and rustc-demangle's alternate
  form does. The crate hash changes from build to build; profile function names
  must not, just as legacy Rust names lose their `::h<hash>`.

Like `c++filt`, a `.suffix` (`.llvm.1234`, `.cold`) is dropped, the instantiating
crate is not printed, and a const integer wider than 64 bits prints in hex (all its
digits: binutils 2.40 drops the first one and prints the `_` that ends them).

Malformed input gives None, and a few things libiberty lets through count as malformed
here, as in rustc-demangle: backreferences that do not point backwards, numbers past 64
bits, lifetimes no binder introduced, punycode that ends mid-character. Bounds on input
length, output length, nesting depth and work keep hostile input cheap (None as well).
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_INPUT = 16 * 1024  # characters of mangled name, without the `_R`
MAX_OUTPUT = 64 * 1024  # characters of demangled name
MAX_DEPTH = 150  # nested paths, types and consts (Python frames stay under ~3x this)
MAX_STEPS = 20_000  # paths, types and consts visited, backreferences included
MAX_BOUND_LIFETIMES = 256

_BODY = re.compile(r"[A-Z][_0-9a-zA-Z]*")
_BASE_62 = {
    c: i for i, c in enumerate("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
}
_INTEGER_62 = re.compile(r"([0-9a-zA-Z]*)_")
# `u` marks punycode; a length without leading zeros; `_` separates digit-led text.
_IDENT_START = re.compile(r"(u?)(0|[1-9][0-9]*)_?")
_BASIC_TYPES = {
    "a": "i8",
    "b": "bool",
    "c": "char",
    "d": "f64",
    "e": "str",
    "f": "f32",
    "h": "u8",
    "i": "isize",
    "j": "usize",
    "l": "i32",
    "m": "u32",
    "n": "i128",
    "o": "u128",
    "p": "_",
    "s": "i16",
    "t": "u16",
    "u": "()",
    "v": "...",
    "x": "i64",
    "y": "u64",
    "z": "!",
}
_UNSIGNED = "htmyoj"
_SIGNED = "aslxni"
_NAMESPACES = {"C": "closure", "S": "shim"}
_CHAR_ESCAPES = {0x09: "\\t", 0x0D: "\\r", 0x0A: "\\n"}


class Malformed(Exception):
    """Not a well-formed v0 symbol, or past one of the bounds."""


def demangle_v0(symbol: str, verbose: bool = False) -> str | None:
    """Readable form of a v0 symbol (`_R...`); None when it is not one."""
    if not symbol.startswith("_R"):
        return None
    body = symbol[2:].split(".", 1)[0]
    if len(body) > MAX_INPUT or not _BODY.fullmatch(body):
        return None
    parser = _Parser(body, verbose)
    try:
        return parser.symbol()
    except (Malformed, RecursionError):
        return None


def _decode_punycode(ascii_part: str, code: str) -> str:
    """RFC 3492 decoding (base 36, lowercase digits, as rustc encodes identifiers)."""
    out = list(ascii_part)
    char, index, bias, pos, first = 0x80, 0, 72, 0, True
    while pos < len(code):
        delta, weight, k = 0, 1, 36
        while True:
            if pos >= len(code) or weight > 1 << 32:
                raise Malformed("punycode")
            digit = _punycode_digit(code[pos])
            pos += 1
            delta += digit * weight
            threshold = min(max(k - bias, 1), 26)
            if digit < threshold:
                break
            weight *= 36 - threshold
            k += 36
        index += delta
        char += index // (len(out) + 1)
        index %= len(out) + 1
        if char > 0x10FFFF or 0xD800 <= char <= 0xDFFF:
            raise Malformed("punycode")
        out.insert(index, chr(char))
        index += 1
        bias = _punycode_bias(delta, len(out), first)
        first = False
    return "".join(out)


def _punycode_digit(letter: str) -> int:
    if "a" <= letter <= "z":
        return ord(letter) - ord("a")
    if "0" <= letter <= "9":
        return 26 + ord(letter) - ord("0")
    raise Malformed("punycode digit")


def _punycode_bias(delta: int, count: int, first: bool) -> int:
    delta = delta // 700 if first else delta // 2
    delta += delta // count
    k = 0
    while delta > (35 * 26) // 2:
        delta //= 35
        k += 36
    return k + (36 * delta) // (delta + 38)


def _print_char(value: int) -> str:
    """A `char` const as libiberty prints it: printable ASCII as is, else escaped."""
    if value in _CHAR_ESCAPES:
        return f"'{_CHAR_ESCAPES[value]}'"
    if 0x20 < value < 0x7E:
        return f"'{chr(value)}'"
    return f"'\\u{{{value:x}}}'"


class _Parser:
    """Recursive-descent parser that prints as it parses, like libiberty's."""

    def __init__(self, body: str, verbose: bool) -> None:
        self.sym = body + "\0"
        self.end = len(body)
        self.pos = 0
        self.verbose = verbose
        self.out: list[str] = []
        self.size = 0
        self.skipping = False  # parse without printing (impl paths, instantiating crate)
        self.depth = 0
        self.steps = 0
        self.bound_lifetimes = 0

    # --- reading ------------------------------------------------------------

    def peek(self) -> str:
        return self.sym[self.pos]  # the "\0" sentinel at the end

    def eat(self, char: str) -> bool:
        if self.sym[self.pos] == char:
            self.pos += 1
            return True
        return False

    def next(self) -> str:
        char = self.sym[self.pos]
        if char == "\0":
            raise Malformed("truncated")
        self.pos += 1
        return char

    def enter(self) -> None:
        self.depth += 1
        self.steps += 1
        if self.depth > MAX_DEPTH or self.steps > MAX_STEPS:
            raise Malformed("too deep or too long")

    def integer_62(self) -> int:
        """`_` is 0; `<base-62 digits>_` is their value + 1."""
        match = _INTEGER_62.match(self.sym, self.pos)
        if match is None or len(match.group(1)) > 11:
            raise Malformed("base-62 number")
        self.pos = match.end()
        if not match.group(1):
            return 0
        value = 0
        for char in match.group(1):
            value = value * 62 + _BASE_62[char]
        if value >= 1 << 64:
            raise Malformed("base-62 number too large")
        return value + 1

    def opt_integer_62(self, tag: str) -> int:
        return 1 + self.integer_62() if self.eat(tag) else 0

    def hex_nibbles(self) -> str:
        start = self.pos
        while not self.eat("_"):
            if self.next() not in "0123456789abcdef":
                raise Malformed("hex digit")
        return self.sym[start : self.pos - 1]

    def ident(self) -> str:
        """An identifier, punycode decoded; "" for an empty one."""
        match = _IDENT_START.match(self.sym, self.pos)
        if match is None or len(match.group(2)) > 6:
            raise Malformed("identifier length")
        start = match.end()
        self.pos = start + int(match.group(2))
        if self.pos > self.end:
            raise Malformed("identifier past the end")
        text = self.sym[start : self.pos]
        if not match.group(1):
            return text
        ascii_part, _, code = text.rpartition("_")
        if not code:
            raise Malformed("empty punycode")
        return _decode_punycode(ascii_part, code)

    def backref(self) -> int:
        """Target of a `B<base-62>` whose `B` is already read; only backwards."""
        tag_pos = self.pos - 1
        target = self.integer_62()
        if target >= tag_pos:
            raise Malformed("backreference not backwards")
        return target

    # --- printing -----------------------------------------------------------

    def emit(self, text: str) -> None:
        if self.skipping:
            return
        self.size += len(text)
        if self.size > MAX_OUTPUT:
            raise Malformed("output too long")
        self.out.append(text)

    def lifetime(self, index: int) -> None:
        """Lifetime 0 is `'_`; 1.. are the late-bound ones of enclosing binders."""
        if index == 0:
            self.emit("'_")
            return
        if index > self.bound_lifetimes:
            raise Malformed("unbound lifetime")
        depth = self.bound_lifetimes - index
        self.emit("'" + chr(ord("a") + depth) if depth < 26 else f"'_{depth}")

    def binder(self) -> None:
        """An optional `G` binder: `for<'a, 'b> `."""
        count = self.opt_integer_62("G")
        if count > MAX_BOUND_LIFETIMES:
            raise Malformed("too many bound lifetimes")
        if count:
            self.emit("for<")
            for i in range(count):
                self.emit(", " if i else "")
                self.bound_lifetimes += 1
                self.lifetime(1)
            self.emit("> ")

    # --- grammar ------------------------------------------------------------

    def symbol(self) -> str:
        self.path(in_value=True)
        if self.pos < self.end:  # the instantiating crate: parsed, not printed
            self.skipping = True
            self.path(in_value=False)
        if self.pos != self.end:
            raise Malformed("trailing characters")
        return "".join(self.out)

    def path(self, in_value: bool) -> None:
        self.enter()
        tag = self.next()
        if tag == "C":
            disambiguator = self.opt_integer_62("s")
            self.emit(self.ident())
            if self.verbose:
                self.emit(f"[{disambiguator:x}]")
        elif tag == "N":
            self.nested_path(in_value)
        elif tag in "MXY":
            self.impl_path(tag)
        elif tag == "I":
            self.path(in_value)
            self.emit("::<" if in_value else "<")
            self.generic_args()
            self.emit(">")
        elif tag == "B":
            self.follow(self.backref(), lambda: self.path(in_value))
        else:
            raise Malformed("path tag")
        self.depth -= 1

    def nested_path(self, in_value: bool) -> None:
        namespace = self.next()
        if not ("a" <= namespace <= "z" or "A" <= namespace <= "Z"):
            raise Malformed("namespace")
        self.path(in_value)
        disambiguator = self.opt_integer_62("s")
        name = self.ident()
        if namespace.isupper():  # closures, shims and other compiler-made items
            self.emit("::{" + _NAMESPACES.get(namespace, namespace))
            self.emit(f":{name}#{disambiguator}}}" if name else f"#{disambiguator}}}")
        elif name:
            self.emit("::" + name)

    def impl_path(self, tag: str) -> None:
        """`<T>` (inherent impl, M), `<T as Trait>` (trait impl X, or Y without impl)."""
        if tag != "Y":
            self.opt_integer_62("s")
            skipping, self.skipping = self.skipping, True
            self.path(in_value=False)  # the impl's own path is not printed
            self.skipping = skipping
        self.emit("<")
        self.type()
        if tag != "M":
            self.emit(" as ")
            self.path(in_value=False)
        self.emit(">")

    def follow(self, target: int, parse: Callable[[], None]) -> None:
        """Parse at a backreference's target, then carry on after it (not when skipping)."""
        if self.skipping:
            return
        saved, self.pos = self.pos, target
        parse()
        self.pos = saved

    def generic_args(self) -> None:
        first = True
        while not self.eat("E"):
            self.emit("" if first else ", ")
            first = False
            if self.eat("L"):
                self.lifetime(self.integer_62())
            elif self.eat("K"):
                self.const()
            else:
                self.type()

    def type(self) -> None:
        self.enter()
        tag = self.next()
        if tag in _BASIC_TYPES:
            self.emit(_BASIC_TYPES[tag])
        elif tag in "RQ":
            self.emit("&")
            if self.eat("L"):
                index = self.integer_62()
                if index:
                    self.lifetime(index)
                    self.emit(" ")
            self.emit("mut " if tag == "Q" else "")
            self.type()
        elif tag in "PO":
            self.emit("*const " if tag == "P" else "*mut ")
            self.type()
        elif tag in "AS":
            self.emit("[")
            self.type()
            if tag == "A":
                self.emit("; ")
                self.const()
            self.emit("]")
        elif tag == "T":
            self.tuple()
        elif tag == "F":
            self.fn_type()
        elif tag == "D":
            self.dyn_type()
        elif tag == "B":
            self.follow(self.backref(), self.type)
        else:
            self.pos -= 1
            self.path(in_value=False)
        self.depth -= 1

    def type_list(self) -> int:
        """Types up to an `E`, comma-separated; how many there were."""
        count = 0
        while not self.eat("E"):
            self.emit(", " if count else "")
            self.type()
            count += 1
        return count

    def tuple(self) -> None:
        self.emit("(")
        self.emit(",)" if self.type_list() == 1 else ")")  # a 1-tuple is `(T,)`

    def fn_type(self) -> None:
        """`for<'a> unsafe extern "C" fn(&'a u8) -> u8`."""
        saved = self.bound_lifetimes
        self.binder()
        if self.eat("U"):
            self.emit("unsafe ")
        if self.eat("K"):
            abi = "C" if self.eat("C") else self.abi()
            self.emit(f'extern "{abi}" ')
        self.emit("fn(")
        self.type_list()
        self.emit(")")
        if not self.eat("u"):
            self.emit(" -> ")
            self.type()
        self.bound_lifetimes = saved

    def abi(self) -> str:
        """An ABI name; its `-` were mangled as `_` (`C-unwind` is `C_unwind`)."""
        punycode = self.peek() == "u"
        name = self.ident()
        if punycode or not name:
            raise Malformed("ABI")
        return name.replace("_", "-")

    def dyn_type(self) -> None:
        """`dyn for<'a> Trait<Assoc = T> + Send + 'b`."""
        self.emit("dyn ")
        saved = self.bound_lifetimes
        self.binder()
        first = True
        while not self.eat("E"):
            self.emit("" if first else " + ")
            first = False
            self.dyn_trait()
        self.bound_lifetimes = saved
        if not self.eat("L"):
            raise Malformed("dyn lifetime")
        index = self.integer_62()
        if index:
            self.emit(" + ")
            self.lifetime(index)

    def dyn_trait(self) -> None:
        """A trait whose `<...>` stays open for its associated-type bindings (`p`)."""
        is_open = self.path_maybe_open()
        while self.eat("p"):
            self.emit(", " if is_open else "<")
            is_open = True
            self.emit(self.ident() + " = ")
            self.type()
        if is_open:
            self.emit(">")

    def path_maybe_open(self) -> bool:
        self.enter()
        is_open = False
        if self.eat("B"):
            target = self.backref()
            if not self.skipping:
                saved, self.pos = self.pos, target
                is_open = self.path_maybe_open()
                self.pos = saved
        elif self.eat("I"):
            self.path(in_value=False)
            self.emit("<")
            self.generic_args()
            is_open = True
        else:
            self.path(in_value=False)
        self.depth -= 1
        return is_open

    def const(self) -> None:
        self.enter()
        if self.eat("B"):
            self.follow(self.backref(), self.const)
            self.depth -= 1
            return
        tag = self.next()
        if tag == "p":
            self.emit("_")
        elif tag in _UNSIGNED or tag in _SIGNED or tag in "bc":
            self.const_value(tag)
            if self.verbose:
                self.emit(": " + _BASIC_TYPES[tag])
        else:
            raise Malformed("const type")
        self.depth -= 1

    def const_value(self, tag: str) -> None:
        negative = tag in _SIGNED and self.eat("n")
        digits = self.hex_nibbles()
        if not digits:
            raise Malformed("empty const")
        if tag == "b":
            if digits not in ("0", "1"):
                raise Malformed("bool const")
            self.emit("true" if digits == "1" else "false")
        elif tag == "c":
            if len(digits) > 8:
                raise Malformed("char const")
            self.emit(_print_char(int(digits, 16)))
        else:
            value = int(digits, 16) if len(digits) <= 16 else None
            self.emit(("-" if negative else "") + (f"0x{digits}" if value is None else str(value)))
