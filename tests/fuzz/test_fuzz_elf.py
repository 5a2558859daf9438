"""The ELF reader and the symbolizer on corrupted binaries.

Real small binaries (compiled by the c_binaries fixture, one stripped with a
.gnu_debuglink) get random byte flips, truncations and header fields set to edge values
(ELF header, section and program headers, symbols, notes). ElfInfo either reads the file
or raises ElfReadError, never anything else; it never hangs (a per-example alarm raises a
BaseException the reader cannot swallow); it never blows up memory (each example's peak
resident memory is measured, and address space is capped as a safety net). The Symbolizer
given a process mapping such a file returns one Location per address, addresses intact.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import struct
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.elf.reader import ElfInfo, ElfReadError, read_build_id
from agent.model import Mapping, ProcessInfo
from agent.symbolize.symbolizer import Symbolizer
from tests.conftest import require_tool
from tests.fuzz import fuzz_settings

SECONDS_PER_EXAMPLE = 20  # generous: a parse takes milliseconds; a hang takes forever
ADDRESS_SPACE_HEADROOM = 6 << 30  # safety net: beyond this an example's allocations fail
RSS_BUDGET = 128 << 20  # resident memory one example may add: files here are < 40 KiB
BASE = 0x7F3400000000
SHF_COMPRESSED = 0x800

# Field offsets and widths of ELF64 little-endian headers (independent of the reader).
ELF_HEADER_FIELDS = {
    "ei_class": (4, "B"),
    "ei_data": (5, "B"),
    "e_type": (16, "H"),
    "e_phoff": (32, "Q"),
    "e_shoff": (40, "Q"),
    "e_ehsize": (52, "H"),
    "e_phentsize": (54, "H"),
    "e_phnum": (56, "H"),
    "e_shentsize": (58, "H"),
    "e_shnum": (60, "H"),
    "e_shstrndx": (62, "H"),
}
SECTION_FIELDS = {
    "sh_name": (0, "I"),
    "sh_type": (4, "I"),
    "sh_flags": (8, "Q"),
    "sh_offset": (24, "Q"),
    "sh_size": (32, "Q"),
    "sh_link": (40, "I"),
    "sh_info": (44, "I"),
    "sh_entsize": (56, "Q"),
}
SEGMENT_FIELDS = {
    "p_type": (0, "I"),
    "p_offset": (8, "Q"),
    "p_vaddr": (16, "Q"),
    "p_filesz": (32, "Q"),
    "p_memsz": (40, "Q"),
}
ENTRY_FIELDS = {  # a symbol (st_name, st_info, st_shndx, st_value, st_size) or a note header
    "st_name": (0, "I"),
    "st_info": (4, "B"),
    "st_shndx": (6, "H"),
    "st_value": (8, "Q"),
    "st_size": (16, "Q"),
    "n_namesz": (0, "I"),
    "n_descsz": (4, "I"),
    "n_type": (8, "I"),
}
WIDTH_MASK = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": 2**64 - 1}


@dataclass(frozen=True)
class Image:
    """A binary's bytes and where its header tables and entries are."""

    name: str
    data: bytes
    sections: tuple[tuple[int, int, int, int], ...]  # (header offset, type, offset, size)
    segments: tuple[int, ...]  # program header offsets


def image(path: Path) -> Image:
    data = path.read_bytes()
    assert data[4:6] == b"\x02\x01", "the fixture binaries are ELF64 little-endian"
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    sections = []
    for index in range(shnum):
        header = shoff + index * shentsize
        sh_type, offset, size = (
            struct.unpack_from("<I", data, header + 4)[0],
            *struct.unpack_from("<QQ", data, header + 24),
        )
        sections.append((header, sh_type, offset, size))
    segments = tuple(phoff + index * phentsize for index in range(phnum))
    return Image(path.name, data, tuple(sections), segments)


@pytest.fixture(scope="module")
def images(c_binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, ...]:
    """PIE, non-PIE, a shared library, and a stripped PIE with a .gnu_debuglink."""
    objcopy = require_tool("objcopy")
    work = tmp_path_factory.mktemp("elf")
    stripped, debug = work / "spin_stripped", work / "spin.debug"
    subprocess.run([objcopy, "--only-keep-debug", c_binaries / "spin_pie", debug], check=True)
    subprocess.run([objcopy, "--strip-debug", c_binaries / "spin_pie", stripped], check=True)
    subprocess.run([objcopy, f"--add-gnu-debuglink={debug}", stripped], check=True)
    paths = [c_binaries / "spin_pie", c_binaries / "spin_nopie", c_binaries / "libspin.so"]
    found = tuple(image(path) for path in [*paths, stripped, debug])
    IMAGES.update((img.name, img) for img in found)
    return found


def put(data: bytearray, offset: int, code: str, value: int) -> None:
    size = struct.calcsize(code)
    if offset >= 0 and offset + size <= len(data):
        struct.pack_into("<" + code, data, offset, value & WIDTH_MASK[code])


# Header fields far more often than cuts: a cut file mostly fails the first bounds check.
KINDS = ["header", "section", "section", "section", "segment", "entry", "entry", "flip", "cut"]
# The fixture's images, by name: strategies name them rather than carry their bytes, so
# that hypothesis reports stay short.
IMAGES: dict[str, Image] = {}


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """One binary with 1-6 corruptions: edge values in header fields, flips, a cut."""
    img = IMAGES[draw(st.sampled_from(sorted(IMAGES)))]
    data = bytearray(img.data)
    size = len(data)
    edge = st.one_of(
        st.sampled_from(
            [0, 1, 2, 0x40, 0xFF, SHF_COMPRESSED, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1]
        ),
        st.sampled_from([2**64 - 1, size - 1, size, size + 1, size * 2]),
        st.integers(0, 2**64 - 1),
    )
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(KINDS))
        if kind == "header":
            offset, code = ELF_HEADER_FIELDS[draw(st.sampled_from(sorted(ELF_HEADER_FIELDS)))]
            put(data, offset, code, draw(edge))
        elif kind == "section" and img.sections:
            header = draw(st.sampled_from(img.sections))[0]
            offset, code = SECTION_FIELDS[draw(st.sampled_from(sorted(SECTION_FIELDS)))]
            put(data, header + offset, code, draw(edge))
        elif kind == "segment" and img.segments:
            header = draw(st.sampled_from(img.segments))
            offset, code = SEGMENT_FIELDS[draw(st.sampled_from(sorted(SEGMENT_FIELDS)))]
            put(data, header + offset, code, draw(edge))
        elif kind == "entry" and img.sections:
            # A symbol or note inside a section's bytes (symtab, dynsym, notes, ...).
            _, _, start, length = draw(st.sampled_from(img.sections))
            if length > 0 and start + length <= size:
                entry = start + draw(st.integers(0, max(0, length - 24))) // 24 * 24
                offset, code = ENTRY_FIELDS[draw(st.sampled_from(sorted(ENTRY_FIELDS)))]
                put(data, entry + offset, code, draw(edge))
        elif kind == "flip" and data:  # spread over the file (hypothesis favours small ints)
            spread = draw(st.randoms(use_true_random=False))
            for _ in range(draw(st.integers(1, 16))):
                data[spread.randrange(len(data))] = spread.randrange(256)
        elif kind == "cut":  # mostly near the end, where the section headers are
            end = len(data)
            del data[draw(st.one_of(st.integers(max(0, end - 4096), end), st.integers(0, end))) :]
    return bytes(data)


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` can hide it."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"no result within {SECONDS_PER_EXAMPLE}s")


def _status_bytes(field: str) -> int:
    """A "VmXxx:  N kB" line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Restart VmHWM (peak RSS) from the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@dataclass
class Usage:
    peak_rss_growth: int = 0  # bytes the example added to resident memory at its peak


@contextmanager
def guarded(headroom: int = ADDRESS_SPACE_HEADROOM) -> Iterator[Usage]:
    """One example under an alarm (hangs) and an address-space cap (a safety net against a
    runaway taking the machine down); measures the example's peak resident memory.

    Address space is not the measure: Python's file read(n) reserves n bytes up front
    (virtual, never touched, nor resident) when a header claims a 4 GiB name.
    """
    usage = Usage()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status_bytes("VmSize") + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    measured = _reset_peak_rss()
    start_rss = _status_bytes("VmRSS")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.alarm(SECONDS_PER_EXAMPLE)
    try:
        yield usage
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
        if measured:
            usage.peak_rss_growth = _status_bytes("VmHWM") - start_rss


def read_or_reject(data: bytes | Path) -> tuple[ElfInfo | None, Usage]:
    """(ElfInfo of bytes or of a file, or None for ElfReadError; the memory it took)."""
    with guarded() as usage:
        try:
            if isinstance(data, Path):  # a real file: reads past its end behave otherwise
                return ElfInfo.read(str(data)), usage
            return ElfInfo.from_stream(io.BytesIO(data)), usage
        except ElfReadError:
            return None, usage


def test_the_images_read_cleanly(images: tuple[Image, ...]) -> None:
    """The corruptions start from files the reader fully understands."""
    for img in images:
        info = ElfInfo.from_stream(io.BytesIO(img.data))
        assert info.build_id and info.loads, img.name
    stripped = next(img for img in images if img.name == "spin_stripped")
    info = ElfInfo.from_stream(io.BytesIO(stripped.data))
    assert info.debuglink is not None and info.debuglink.name == "spin.debug"


def test_corrupted_elf_reads_or_raises_elf_read_error(
    images: tuple[Image, ...], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("corrupt") / "binary"

    @fuzz_settings(250)
    @given(corrupted())
    def check(data: bytes) -> None:
        info, usage = read_or_reject(data)
        path.write_bytes(data)
        from_file, file_usage = read_or_reject(path)
        assert max(usage.peak_rss_growth, file_usage.peak_rss_growth) < RSS_BUDGET
        if info is None or from_file is None:  # same bytes, same verdict
            assert info is None and from_file is None
            return
        assert (info.build_id, info.loads, info.debuglink, info.has_dwarf) == (
            from_file.build_id,
            from_file.loads,
            from_file.debuglink,
            from_file.has_dwarf,
        )
        assert isinstance(info.build_id, str)  # and what was read is usable
        for vaddr in (0, info.load_address, 2**64 - 1):
            name = info.symbols.lookup(vaddr)
            assert name is None or isinstance(name, str)

    check()


def test_symbolizer_on_a_corrupted_mapped_file(
    images: tuple[Image, ...], tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("mapped")

    @fuzz_settings(80)
    @given(corrupted(), st.lists(st.integers(0, 0x1FFFF), min_size=1, max_size=6))
    def check(data: bytes, offsets: list[int]) -> None:
        path = work / "corrupt"
        path.write_bytes(data)
        st_ = os.stat(path)
        dev = f"{os.major(st_.st_dev):02x}:{os.minor(st_.st_dev):02x}"
        mapping = Mapping(BASE, BASE + 0x10000, 0, str(path), dev, st_.st_ino, "r-xp")
        process = ProcessInfo(0, 0, "corrupt", str(path), (mapping,))
        stack = tuple(BASE + offset for offset in offsets)
        with guarded() as usage:
            assert isinstance(read_build_id(str(path)), str)
            locations = Symbolizer().symbolize(process, stack, ())
        assert usage.peak_rss_growth < RSS_BUDGET
        assert [loc.address for loc in locations] == list(stack)
        for depth, loc in enumerate(locations):
            looked_up = loc.address - (depth > 0)  # callers: the call before the return address
            assert loc.mapping == (mapping if mapping.contains(looked_up) else None)
            assert not loc.kernel

    check()


def _compressed_symtab(img: Image, inflated: int) -> bytes:
    """`img` whose .symtab is SHF_COMPRESSED: zlib of `inflated` zero bytes, at the end."""
    compressor = zlib.compressobj(6)
    chunk = bytes(1 << 20)
    blob = b"".join(compressor.compress(chunk) for _ in range(inflated >> 20))
    blob += compressor.flush()
    blob += bytes(-(len(blob) + 24) % 24)  # sh_size a multiple of sh_entsize, as pyelftools checks
    chdr = struct.pack("<IIQQ", 1, 0, inflated, 8)  # ELFCOMPRESS_ZLIB, size, alignment
    data = bytearray(img.data)
    offset = len(data)
    data += chdr + blob
    symtab = next(header for header, sh_type, _, _ in img.sections if sh_type == 2)  # SHT_SYMTAB
    flags = struct.unpack_from("<Q", data, symtab + 8)[0]
    struct.pack_into("<QQQ", data, symtab + 8, flags | SHF_COMPRESSED, 0, 0)
    struct.pack_into("<QQ", data, symtab + 24, offset, len(chdr) + len(blob))
    return bytes(data)


def test_a_compressed_symbol_table_bomb_is_not_inflated(images: tuple[Image, ...]) -> None:
    """270 KiB on disk inflating to 256 MiB: refused, or read without it, never inflated."""
    data = _compressed_symtab(images[0], 256 << 20)
    assert len(data) < 1 << 20
    _, usage = read_or_reject(data)
    assert usage.peak_rss_growth < RSS_BUDGET, f"{usage.peak_rss_growth >> 20} MiB resident"
