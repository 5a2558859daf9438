"""The unwind table bias of an executable mapping, for every linker's segment layout.

bfd pads each segment to its own file page; gold puts read-only data and code in one
segment; lld (rustc's default linker) and mold pack the read-only segment and the
code into the same file page, so the code's mapping starts in two segments' bytes.
Each program is linked for real, run, and its executable mapping read from
/proc/PID/maps; the bias must send `main`'s runtime address to main's table pc.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.elf.reader import ElfInfo
from agent.process.maps import parse_maps
from agent.unwind.mappings import load_of, table_bias
from tests.conftest import require_tool
from tests.symbolize.helpers import running, symbol_vaddr

PF_X = 1
SOURCE = "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n"
RUSTUP_LLD = "~/.rustup/toolchains/*/lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld"


def lld_directory() -> Path:
    """rustup's gcc-ld directory: its ld.lld is the lld that rustc links with."""
    found = sorted(Path.home().glob(RUSTUP_LLD.removeprefix("~/")))
    if not found:
        pytest.fail("no rustup gcc-ld/ld.lld (rustc's lld); install rustup's stable toolchain")
    return found[0]


def link(directory: Path, linker: str) -> Path:
    source = directory / "pause.c"
    source.write_text(SOURCE)
    binary = directory / f"pause-{linker}"
    flags = [f"-fuse-ld={linker}"]
    if linker == "lld":
        flags.append(f"-B{lld_directory()}")
    elif linker == "mold":
        require_tool("ld.mold")
    subprocess.run(
        [require_tool("gcc"), "-O2", "-g", *flags, str(source), "-o", str(binary)], check=True
    )
    return binary


@pytest.mark.parametrize("linker", ["bfd", "gold", "lld", "mold"])
def test_the_code_mapping_uses_the_code_segment(tmp_path: Path, linker: str) -> None:
    binary = link(tmp_path, linker)
    loads = ElfInfo.read(str(binary)).loads
    code = next(load for load in loads if load.flags & PF_X)
    main = symbol_vaddr(binary, "main")
    with running([str(binary)], str(binary)) as pid:
        maps = parse_maps(Path(f"/proc/{pid}/maps").read_text())
    mapping = next(m for m in maps if m.path == str(binary) and "x" in m.perms)
    assert load_of(mapping, loads) == code
    runtime_main = mapping.start + (main - code.vaddr) + (code.offset - mapping.offset)
    assert mapping.contains(runtime_main)
    table_base = 0x1000  # any base: the table's pcs are vaddr - base
    bias = table_bias(mapping, loads, table_base)
    assert bias is not None and runtime_main - bias == main - table_base
