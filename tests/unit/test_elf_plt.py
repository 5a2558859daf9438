"""PLT stubs named `name@plt`, checked against objdump on real and freshly linked binaries.

objdump (binutils 2.40) labels each stub `<name@plt>:`; plt_symbols must find every one
at the same address and name nothing else but the lazy PLT's header, which objdump
labels `<first@plt-0x10>:` or `<.plt>:` and perf `.plt`.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.elf.plt import PltSymbol, _is_header, _jump_slot, plt_symbols
from tests.conftest import require_tool

LABEL = re.compile(r"^([0-9a-f]+) <(.+)>:$", re.MULTILINE)
PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    void *(*volatile allocate)(size_t) = malloc;  /* address taken: GLOB_DAT, .plt.got */
    char *copy = allocate(64);
    strcpy(copy, argc > 1 ? argv[1] : "plt");
    printf("%s %zu\n", copy, strlen(copy));
    free(copy);
    return 0;
}
"""
EM_AARCH64 = 183
Compile = Callable[[str, list[str]], Path]


def read_plt(data: bytes) -> list[PltSymbol]:
    return plt_symbols(ELFFile(io.BytesIO(data)))


PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")


def plt_section(path: Path, name: str = ".plt") -> tuple[int, int, int] | None:
    """sh_addr, sh_offset and sh_size of a file's section `name`, None if it has none."""
    with open(path, "rb") as stream:
        section = ELFFile(stream).get_section_by_name(name)
        if section is None:
            return None
        return section["sh_addr"], section["sh_offset"], section["sh_size"]


def objdump_labels(path: Path) -> dict[int, str]:
    """Every label objdump prints in the PLT sections, by address."""
    objdump = require_tool("objdump")
    sections = [f"--section={name}" for name in PLT_SECTIONS]
    listing = subprocess.run(
        [objdump, "-d", *sections, str(path)], check=True, capture_output=True, text=True
    ).stdout
    return {int(address, 16): label for address, label in LABEL.findall(listing)}


def objdump_stubs(path: Path) -> dict[int, str]:
    """objdump's `<name@plt>` labels by address, any `@VERSION` dropped.

    `*ABS*+0x...@plt` labels are IRELATIVE (IFUNC) stubs: they bind no symbol, so
    objdump names them after the resolver's address and plt_symbols leaves them out.
    """
    return {
        address: label.partition("@")[0]
        for address, label in objdump_labels(path).items()
        if label.endswith("@plt") and not label.startswith("*ABS*")
    }


def assert_matches_objdump(path: Path) -> list[PltSymbol]:
    symbols = read_plt(path.read_bytes())
    expected = objdump_stubs(path)
    assert expected, f"{path} has no PLT stubs to compare"
    named = {vaddr: name for vaddr, _, name, _ in symbols}
    assert len(named) == len(symbols), "two names at one address"
    assert {vaddr: named.get(vaddr, "").partition("@")[0] for vaddr in expected} == expected
    assert all(named[vaddr].endswith("@plt") for vaddr in expected)
    extra = {vaddr: name for vaddr, name in named.items() if vaddr not in expected}
    header = plt_section(path)
    assert header is not None
    assert extra == {header[0]: ".plt"}
    # Each symbol ends where objdump's next label or the section does.
    ranges = [found for name in PLT_SECTIONS if (found := plt_section(path, name))]
    boundaries = sorted({*objdump_labels(path), *(addr + size for addr, _, size in ranges)})
    for vaddr, size, name, _ in symbols:
        following = next(boundary for boundary in boundaries if boundary > vaddr)
        assert vaddr + size == following, f"{name} at {vaddr:#x} has size {size}"
    return symbols


def loaded_libc() -> Path:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith("/libc.so.6"):
            return Path(fields[5])
    pytest.fail("libc.so.6 is not mapped into this process")


def test_debian_python_without_symtab() -> None:
    assert_matches_objdump(Path(os.path.realpath(sys.executable)))


def test_debian_libc_with_ifunc_stubs() -> None:
    assert_matches_objdump(loaded_libc())


def test_debian_ls() -> None:
    assert_matches_objdump(Path(require_tool("ls")).resolve())


def test_debian_perf() -> None:
    assert_matches_objdump(Path(require_tool("perf")).resolve())


def lld_dir(tmp_path: Path) -> Path:
    """A directory holding an `ld.lld` for gcc's -B: the system's, or rustup's rust-lld."""
    rustup = sorted(Path.home().glob(".rustup/toolchains/*/lib/rustlib/*/bin/rust-lld"))
    found = shutil.which("ld.lld") or (str(rustup[0]) if rustup else None)
    if found is None:
        pytest.fail("no lld: neither ld.lld nor rustup's rust-lld is installed")
    link = tmp_path / "lld-driver" / "ld.lld"
    link.parent.mkdir()
    link.symlink_to(found)
    return link.parent


# Debian's crt*.o carry no IBT property, so -fcf-protection alone leaves the PLT
# unchanged: the linker is told to make an IBT PLT (.plt.sec) regardless.
BUILDS = {
    "bfd": [],
    "bfd-nopie": ["-no-pie"],
    "bfd-shared": ["-shared", "-fPIC"],
    "bfd-ibt": ["-fcf-protection=full", "-Wl,-z,ibt"],
    "gold": ["-fuse-ld=gold"],
    "lld": ["-fuse-ld=lld"],
    "lld-ibt": ["-fuse-ld=lld", "-fcf-protection=full", "-Wl,-z,force-ibt"],
}


@pytest.fixture
def compile_program(tmp_path: Path) -> Compile:
    """Links PROGRAM with gcc and extra flags into tmp_path/name."""

    def build(name: str, flags: list[str]) -> Path:
        gcc = require_tool("gcc")
        if "-fuse-ld=gold" in flags:
            require_tool("ld.gold")
        if "-fuse-ld=lld" in flags:
            flags = [*flags, f"-B{lld_dir(tmp_path)}"]
        source, output = tmp_path / "plt.c", tmp_path / name
        source.write_text(PROGRAM)
        subprocess.run([gcc, "-O1", *flags, "-o", str(output), str(source)], check=True)
        return output

    return build


@pytest.mark.parametrize("build", list(BUILDS))
def test_compiled_program(build: str, compile_program: Compile) -> None:
    binary = compile_program(build, BUILDS[build])
    symbols = assert_matches_objdump(binary)
    names = {name for _, _, name, _ in symbols}
    assert {"strcpy@plt", "printf@plt", "free@plt"} <= names
    with open(binary, "rb") as stream:
        has_sec = ELFFile(stream).get_section_by_name(".plt.sec") is not None
    assert has_sec == build.endswith("-ibt")
    plt = plt_section(binary)
    assert plt is not None
    # As perf: with IBT the lazy entries after the header are part of `.plt` too.
    header_size = plt[2] if has_sec else 16
    assert (plt[0], header_size, ".plt", False) in symbols


def test_not_x86_64_gives_nothing(compile_program: Compile) -> None:
    image = bytearray(compile_program("bfd", []).read_bytes())
    assert read_plt(bytes(image))
    image[18:20] = EM_AARCH64.to_bytes(2, "little")  # e_machine
    assert read_plt(bytes(image)) == []


def test_files_without_named_stubs_give_nothing(tmp_path: Path, compile_program: Compile) -> None:
    static = compile_program("static", ["-static"])
    assert objdump_stubs(static) == {}  # its .plt holds IRELATIVE stubs only
    assert read_plt(static.read_bytes()) == []
    source, obj = tmp_path / "plt.c", tmp_path / "plt.o"  # source left by compile_program
    subprocess.run([require_tool("gcc"), "-c", "-o", str(obj), str(source)], check=True)
    assert read_plt(obj.read_bytes()) == []  # relocatable: no PLT yet


def test_malformed_files_give_what_they_can(compile_program: Compile) -> None:
    binary = compile_program("bfd", [])
    image = binary.read_bytes()
    no_headers = bytearray(image)
    no_headers[0x28:0x30] = bytes(8)  # e_shoff: stripped of section headers
    no_headers[0x3C:0x40] = bytes(4)  # e_shnum, e_shstrndx
    assert read_plt(bytes(no_headers)) == []
    for length in (64, 0x1040, 0x3000, len(image) // 2):
        assert read_plt(image[:length]) == []
    plt = plt_section(binary)
    assert plt is not None
    address, offset, size = plt
    garbage = bytearray(image)
    garbage[offset : offset + size] = b"\xff\x25" * (size // 2)  # jumps to nowhere
    kept = [symbol for symbol in read_plt(image) if symbol[0] >= address + size]
    assert kept  # the .plt.got stub
    assert read_plt(bytes(garbage)) == kept


def test_mold_layouts() -> None:
    """mold's stubs and header, bytes as mold 1.10.1 (Debian bookworm) links them.

    mold is not installed here; it was checked against objdump by hand. It labels its
    stubs itself (`strcpy$plt`, size 0), which plt_symbols' sized `strcpy@plt` outranks.
    """
    stub = bytes.fromhex("f30f1efa 41bb00000000 ff2510240000".replace(" ", ""))
    assert _jump_slot(stub) == 0x3A90 - 0x1670  # stub at 0x1670 reads slot 0x3a90
    header = bytes.fromhex("f30f1efa 4153 ff3524240000 ff2526240000".replace(" ", ""))
    assert _is_header(header + b"\xcc" * 14)
    assert not _is_header(stub) and _jump_slot(header) is None
