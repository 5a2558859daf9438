"""Agreement with binutils' `addr2line -f -i -C` on random code addresses of real
binaries nobody here built, and of programs compiled with the toolchains' defaults:
pyenv's libpython 3.8/3.11/3.12/3.13 (PGO+LTO, hot/cold split functions), Debian's libc
(DWARF from libc6-dbg's separate debug file, found by build id), a C program and a C++
program with templates and lambdas built with -O2 -g (plenty of inlining), and a Rust
release binary with debug info.

How the comparison works. An address is drawn uniformly from a random function
symbol's [start, start + size) (code, not padding). addr2line reports the inline
chain innermost first, as Strobe's Location.frames are. Compared, separately:
  - outermost frame: the real, non-inlined function the address is in, by name. It
    must be the name addr2line prints (the DWARF subprogram's): `foo`, never `foo.cold`
    or `foo.isra.0`, never a neighbour's name. Only when two ELF symbols with the same
    start and size (aliases of one function: `newlocale`, `__newlocale`) cover the
    address is either accepted;
  - innermost frame, where either side sees inlining: the inlined function's name;
  - innermost file and line. Where binutils names another file than Strobe, elfutils'
    eu-addr2line referees: binutils 2.40 misattributes lines of code #included into a
    DWARF 5 compilation unit to the unit's main file (e.g. libc's getproto.c:120 for
    nss/getXXbyYY.c:120; eu-addr2line and llvm-symbolizer agree with Strobe there).
Discriminators are ignored. Thresholds are in REQUIRED; BENCHMARKS.md has the table.
"""

from __future__ import annotations

import bisect
import glob
import os
import random
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.model import Location, ProcessInfo
from agent.symbolize.names import clone_base
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import compile_c, loader_mappings, runtime_address

BASE = 0x7F3C00000000
SAMPLES = 2000
REQUIRED = {"outermost function": 0.99, "innermost function": 0.97, "line": 0.97}
PYENV_VERSIONS = ("3.8", "3.11", "3.12", "3.13")

Frames = list[tuple[str, str, int]]


def libc_path() -> Path:
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if os.path.basename(path).startswith("libc.so"):
            return Path(path)
    pytest.fail("this process maps no libc")


def build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID" in line)


def function_symbols(path: Path) -> list[tuple[int, int, str]]:
    """(start, size, name) of the function symbols in .symtab."""
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection), f"{path} has no .symtab"
        return sorted(
            {
                (int(s["st_value"]), int(s["st_size"]), s.name)
                for s in symtab.iter_symbols()
                if s["st_info"]["type"] in ("STT_FUNC", "STT_LOOS")
                and s["st_value"]
                and s["st_size"] > 1
                and s["st_shndx"] != "SHN_UNDEF"
            }
        )


def short_name(name: str) -> str:
    """A C++/Rust function's unqualified name without template arguments, parameters or
    return type: addr2line prints a DWARF name where it has no linkage name (`describe`
    for `describe(int)`, `__introsort_loop<...>` for `void std::__introsort_loop<...>(...)`)."""
    name = re.sub(r"\s*\[clone [^\]]*\]", "", name).removesuffix(" const")
    while (stripped := re.sub(r"<[^<>]*>", "", name)) != name:
        name = stripped
    if name.endswith(")") and not name.endswith("operator()"):
        depth = 0
        for index in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[index], 0)
            if depth == 0:
                name = name[:index]
                break
    return name.rsplit(" ", 1)[-1].rsplit("::", 1)[-1]


class Aliases:
    """Names of functions that are one function: symbols with the same start and size."""

    def __init__(self, path: Path) -> None:
        self._symbols = function_symbols(path)
        self._starts = [start for start, _, _ in self._symbols]
        self._demangled = demangled_names({name for _, _, name in self._symbols})

    def of(self, vaddr: int) -> set[str]:
        index = bisect.bisect_right(self._starts, vaddr)
        ranges: dict[tuple[int, int], set[str]] = {}
        while index > 0 and vaddr - self._starts[index - 1] < 1 << 20:
            start, size, name = self._symbols[index - 1]
            if start <= vaddr < start + size:
                ranges.setdefault((start, size), set()).add(self._demangled[name])
            index -= 1
        return next((names for names in ranges.values() if len(names) > 1), set())

    def same_function(self, ours: str, theirs: str, vaddr: int) -> bool:
        return short_name(ours) == short_name(theirs) or {ours, theirs} <= self.of(vaddr)


def demangled_names(names: set[str]) -> dict[str, str]:
    """Raw symbol -> what c++filt prints for it without its clone suffixes."""
    ordered = sorted(names)
    out = subprocess.run(
        [require_tool("c++filt")],
        input="\n".join(clone_base(name.split("@")[0]) for name in ordered) + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return dict(zip(ordered, out, strict=True))


def random_code_addresses(path: Path, count: int, seed: int) -> list[int]:
    ranges = sorted({(start, size) for start, size, _ in function_symbols(path)})
    rng = random.Random(seed)
    return [start + rng.randrange(size) for start, size in rng.choices(ranges, k=count)]


def addr2line_batch(binary: Path, vaddrs: list[int], tool_name: str = "addr2line") -> list[Frames]:
    """`addr2line -a -f -i -C` (or eu-addr2line) for many addresses in one run."""
    tool = require_tool(tool_name)
    if not vaddrs:
        return []
    out = subprocess.run(
        [tool, "-a", "-f", "-i", "-C", "-e", str(binary)],
        input="\n".join(f"{v:#x}" for v in vaddrs) + "\n",
        capture_output=True,
        text=True,
        check=False,  # eu-addr2line exits 1 when some address is unknown ("??")
        timeout=600,
    ).stdout.splitlines()
    groups: list[Frames] = []
    index = 0
    while index < len(out):
        assert out[index].startswith("0x"), out[index]
        index += 1
        frames: Frames = []
        while index < len(out) and not out[index].startswith("0x"):
            function, location = out[index], out[index + 1]
            if " inlined at " in function:  # eu-addr2line's form of an inlined frame
                function = function.split(" inlined at ")[0]
            file, _, line = location.split(" (discriminator")[0].rpartition(":")
            if file.count(":") and file.rpartition(":")[2].isdigit():  # eu: file:line:column
                file, line = file.rpartition(":")[0], file.rpartition(":")[2]
            frames.append((function, file, int(line) if line.isdigit() else 0))
            index += 2
        groups.append(frames)
    assert len(groups) == len(vaddrs)
    return groups


def as_tuples(location: Location) -> Frames:
    return [(f.function, f.file, f.line) for f in location.frames]


def disagreements(mine: Frames, theirs: Frames, aliases: Aliases, vaddr: int) -> set[str]:
    """What differs between Strobe's frames and addr2line's at vaddr (REQUIRED's keys)."""
    if not theirs or theirs[0][0] == "??":
        return set()  # addr2line knows nothing here: nothing to compare
    if not mine:
        return set(REQUIRED)
    found = set()
    if not aliases.same_function(mine[-1][0], theirs[-1][0], vaddr):
        found.add("outermost function")
    if (len(mine) > 1 or len(theirs) > 1) and short_name(mine[0][0]) != short_name(theirs[0][0]):
        found.add("innermost function")
    (_, file, line), (_, their_file, their_line) = mine[0], theirs[0]
    if their_line == 0:  # no line table there (Rust's std): nothing to compare
        return found
    if line != their_line or os.path.normpath(file or "??") != os.path.normpath(their_file):
        found.add("line")
    return found


@dataclass
class Agreement:
    shares: dict[str, float]
    examples: list[str]


def agreement(binary: Path, dwarf_file: Path, seed: int, samples: int = SAMPLES) -> Agreement:
    """Shares of `samples` random addresses of `binary` where Strobe and addr2line agree."""
    process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, BASE))
    symbolizer = Symbolizer()
    assert symbolizer.prepare(process) == 1
    vaddrs = random_code_addresses(dwarf_file, samples, seed)
    expected = addr2line_batch(dwarf_file, vaddrs)
    aliases = Aliases(dwarf_file)
    ours: dict[int, Frames] = {}
    for vaddr in vaddrs:
        runtime = runtime_address(binary, vaddr, process.mappings)
        (location,) = symbolizer.symbolize(process, (runtime,), ())
        ours[vaddr] = as_tuples(location)
    symbolizer.close()
    differing = {
        vaddr: why
        for vaddr, theirs in zip(vaddrs, expected, strict=True)
        if (why := disagreements(ours[vaddr], theirs, aliases, vaddr))
    }
    # elfutils referees what binutils may get wrong: files of #included code, and
    # inline chains (binutils 2.40 names some inlined frames after their caller).
    suspects = [vaddr for vaddr, why in differing.items() if "outermost function" not in why]
    referee = dict(
        zip(suspects, addr2line_batch(dwarf_file, suspects, "eu-addr2line"), strict=True)
    )
    for vaddr, theirs in referee.items():
        if not disagreements(ours[vaddr], theirs, aliases, vaddr):
            del differing[vaddr]
    expected_of = dict(zip(vaddrs, expected, strict=True))
    counts = Counter(reason for why in differing.values() for reason in why)
    examples = [
        f"{vaddr:#x} {sorted(why)}: strobe {ours[vaddr]} addr2line {expected_of[vaddr]}"
        for vaddr, why in differing.items()
    ]
    return Agreement({key: 1 - counts[key] / samples for key in REQUIRED}, examples)


def assert_agrees(result: Agreement) -> None:
    failing = {k: v for k, v in result.shares.items() if v < REQUIRED[k]}
    assert not failing, f"{failing} (required {REQUIRED}):\n" + "\n".join(result.examples[:20])


def pyenv_libpython(version: str) -> Path:
    root = subprocess.run(
        [require_tool("pyenv"), "root"], capture_output=True, text=True, check=True
    ).stdout.strip()
    found = sorted(glob.glob(f"{root}/versions/{version}.*/lib/libpython{version}.so.1.0"))
    if not found:
        pytest.fail(f"pyenv has no CPython {version} with a shared libpython under {root}")
    return Path(found[-1])


@pytest.mark.parametrize("version", PYENV_VERSIONS)
def test_pyenv_libpython_agrees_with_addr2line(version: str) -> None:
    library = pyenv_libpython(version)
    assert_agrees(agreement(library, library, seed=int(version.replace(".", ""))))


def test_libc_with_its_debug_file_agrees_with_addr2line() -> None:
    libc = libc_path()
    identifier = build_id(libc)
    debug = Path("/usr/lib/debug/.build-id") / identifier[:2] / f"{identifier[2:]}.debug"
    if not debug.is_file():
        pytest.fail(f"no libc6-dbg debug file for {libc} ({debug}); run scripts/setup.sh")
    assert_agrees(agreement(libc, debug, seed=3))


def generated_program(directory: Path) -> Path:
    """300 functions, each calling static inline helpers that call each other (-O2)."""
    rng = random.Random(11)
    parts = ["#include <stdlib.h>\n"]
    for i in range(300):
        parts.append(
            f"static inline int leaf{i}(int x) {{\n"
            f"  return x * {rng.randrange(2, 99)} ^ (x >> 3);\n}}\n"
            f"static inline int mid{i}(int x) {{\n  int s = 0;\n"
            f"  for (int j = 0; j < x; j++)\n    s += leaf{i}(j + {i});\n  return s;\n}}\n"
            f"__attribute__((noinline)) int fn{i}(int x) {{\n"
            f"  if (x > {rng.randrange(100)})\n    return mid{i}(x) + leaf{i}(x);\n"
            f"  return mid{i}(x / 2);\n}}\n"
        )
    parts.append("int main(int argc, char **argv) {\n  int s = 0;\n")
    parts.extend(f"  s += fn{i}(argc + atoi(argv[0]));\n" for i in range(300))
    parts.append("  return s & 1;\n}\n")
    source = directory / "generated.c"
    source.write_text("".join(parts))
    return compile_c([source], directory / "generated", "-O2", "-g", compiler=require_tool("gcc"))


def test_a_generated_program_with_inlining_agrees_with_addr2line(tmp_path: Path) -> None:
    binary = generated_program(tmp_path)
    assert_agrees(agreement(binary, binary, seed=5))


def test_a_cpp_program_with_templates_and_lambdas_agrees_with_addr2line(tmp_path: Path) -> None:
    source = Path(__file__).parent / "data" / "templates.cpp"
    binary = compile_c([source], tmp_path / "templates", "-O2", "-g", compiler=require_tool("g++"))
    assert_agrees(agreement(binary, binary, seed=7))


def test_a_rust_release_binary_agrees_with_addr2line(tmp_path: Path) -> None:
    source = Path(__file__).parent / "data" / "work.rs"
    binary = tmp_path / "work"
    subprocess.run(
        [require_tool("rustc"), "-O", "-g", "-o", str(binary), str(source)],
        check=True,
        timeout=300,
    )
    assert_agrees(agreement(binary, binary, seed=9))
