"""Agreement with binutils' `addr2line -f -i` on 1,000 random code addresses each of
Debian's libc (DWARF from libc6-dbg's separate debug file, found by build id) and of
a generated program built with -O2 -g (plenty of inlining).

How the comparison works. An address is drawn uniformly from a random function
symbol's [start, start + size) (code, not padding). addr2line reports the inline
chain innermost first, as Strobe's Location.frames are. Compared:
  - innermost frame: function, file and line;
  - outermost frame: function (the real, non-inlined function the address is in).
Files are compared after os.path.normpath. Where binutils names another file than
Strobe, elfutils' eu-addr2line referees: binutils 2.40 misattributes lines of code
#included into a DWARF 5 compilation unit to the unit's main file (e.g. libc's
getproto.c:120 for nss/getXXbyYY.c:120; eu-addr2line and llvm-symbolizer agree with
each other and with Strobe there).
A non-inlined function is named as the linker named it (symbolic, like llvm-symbolizer,
prefers the symbol table: `freopen.cold`, `setxid_mark_thread.constprop.0`, one of
several aliases at an address) while addr2line prints the DWARF name (`freopen`). So
function names match modulo GCC clone suffixes (.cold, .constprop.N, .isra.N, .part.N,
...) and symbol versions (@GLIBC_x), or when both are symbols covering the address.
Discriminators are ignored. At least 99% of addresses must agree on all four.
"""

from __future__ import annotations

import bisect
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.model import Location, ProcessInfo
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.symbolize.helpers import compile_c, loader_mappings, runtime_address

BASE = 0x7F3C00000000
SAMPLES = 1000
REQUIRED = 0.99

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


def function_ranges(path: Path) -> list[tuple[int, int]]:
    return sorted({(start, size) for start, size, _ in function_symbols(path)})


_CLONE_SUFFIX = re.compile(r"(\.(cold|constprop|isra|part|lto_priv|localalias)(\.\d+)?)+$")


def base_name(name: str) -> str:
    """A symbol name without its version and GCC clone suffixes."""
    return _CLONE_SUFFIX.sub("", name.split("@")[0])


class Names:
    """Function symbols covering an address (the aliases a linker may name it by)."""

    def __init__(self, path: Path) -> None:
        self._symbols = function_symbols(path)
        self._starts = [start for start, _, _ in self._symbols]

    def covering(self, vaddr: int) -> set[str]:
        index = bisect.bisect_right(self._starts, vaddr)
        found = set()
        while index > 0 and vaddr - self._starts[index - 1] < 1 << 20:
            start, size, name = self._symbols[index - 1]
            if start <= vaddr < start + size:
                found.add(base_name(name))
            index -= 1
        return found

    def same_function(self, ours: str, theirs: str, vaddr: int) -> bool:
        if base_name(ours) == base_name(theirs):
            return True
        here = self.covering(vaddr)
        return base_name(ours) in here and base_name(theirs) in here


def random_code_addresses(path: Path, count: int, seed: int) -> list[int]:
    ranges = function_ranges(path)
    rng = random.Random(seed)
    return [start + rng.randrange(size) for start, size in rng.choices(ranges, k=count)]


def addr2line_batch(binary: Path, vaddrs: list[int], tool_name: str = "addr2line") -> list[Frames]:
    """`addr2line -a -f -i` (or eu-addr2line) for many addresses in one run, per address."""
    tool = require_tool(tool_name)
    if not vaddrs:
        return []
    out = subprocess.run(
        [tool, "-a", "-f", "-i", "-e", str(binary)],
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


def disagreement(mine: Frames, theirs: Frames, names: Names, vaddr: int) -> str:
    """ "" when Strobe's frames agree with addr2line's at vaddr, else what differs."""
    if not mine or not theirs or theirs[0][0] == "??":
        return "" if not mine and (not theirs or theirs[0][0] == "??") else "presence"
    (function, file, line), (their_function, their_file, their_line) = mine[0], theirs[0]
    inlined = len(mine) > 1
    if inlined and function != their_function:
        return "innermost function"
    if not names.same_function(mine[-1][0], theirs[-1][0], vaddr):
        return "outermost function"
    if line != their_line:
        return "line"
    if os.path.normpath(file or "??") != os.path.normpath(their_file):  # "??": none known
        return "file"
    return ""


def agreement(binary: Path, dwarf_file: Path, seed: int) -> tuple[float, list[str]]:
    """Share of SAMPLES random addresses of `binary` where Strobe and addr2line agree."""
    process = ProcessInfo(0, 0, "t", str(binary), loader_mappings(binary, BASE))
    symbolizer = Symbolizer()
    assert symbolizer.prepare(process) == 1
    vaddrs = random_code_addresses(dwarf_file, SAMPLES, seed)
    expected = addr2line_batch(dwarf_file, vaddrs)
    names = Names(dwarf_file)
    ours = {}
    suspects: list[int] = []
    for vaddr, theirs in zip(vaddrs, expected, strict=True):
        runtime = runtime_address(binary, vaddr, process.mappings)
        (location,) = symbolizer.symbolize(process, (runtime,), ())
        ours[vaddr] = as_tuples(location)
        if disagreement(ours[vaddr], theirs, names, vaddr):
            suspects.append(vaddr)
    symbolizer.close()
    # Only a file difference goes to the referee; anything else stands.
    second_opinion = addr2line_batch(dwarf_file, suspects, "eu-addr2line")
    referee = dict(zip(suspects, second_opinion, strict=True))
    differences = []
    for vaddr, theirs in zip(vaddrs, expected, strict=True):
        if vaddr not in referee:
            continue
        why = disagreement(ours[vaddr], theirs, names, vaddr)
        if why == "file" and not disagreement(ours[vaddr], referee[vaddr], names, vaddr):
            continue
        differences.append(f"{vaddr:#x} ({why}): strobe {ours[vaddr]} addr2line {theirs}")
    return 1 - len(differences) / SAMPLES, differences


def test_libc_with_its_debug_file_agrees_with_addr2line() -> None:
    libc = libc_path()
    identifier = build_id(libc)
    debug = Path("/usr/lib/debug/.build-id") / identifier[:2] / f"{identifier[2:]}.debug"
    if not debug.is_file():
        pytest.fail(f"no libc6-dbg debug file for {libc} ({debug}); run scripts/setup.sh")
    share, differences = agreement(libc, debug, seed=3)
    assert share >= REQUIRED, "\n".join(differences[:20])


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
    share, differences = agreement(binary, binary, seed=5)
    assert share >= REQUIRED, "\n".join(differences[:20])
