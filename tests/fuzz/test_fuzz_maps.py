"""/proc/PID/maps and /proc/PID/stat parsers on arbitrary text, and maps lines the kernel
can print (any path bytes but "\\n", which the kernel escapes as "\\012") round-tripping."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.model import Mapping
from agent.process.maps import DELETED_SUFFIX, parse_maps, parse_maps_line, parse_stat
from agent.process.reader import read_process
from tests.fuzz import any_text, fuzz_settings

U64 = st.integers(min_value=0, max_value=2**64 - 1)
PERMS = st.builds(
    "".join,
    st.tuples(*(st.sampled_from(pair) for pair in ("r-", "w-", "x-", "ps"))),
)
DEV = st.builds(
    "{:02x}:{:02x}".format,
    st.integers(0, 0xFFF),  # MAJORBITS 12
    st.integers(0, 0xFFFFF),  # MINORBITS 20
)
# A file path as the kernel prints it: "/" then any bytes but "\n", decoded the way the
# process reader decodes them (surrogateescape keeps non-UTF-8 names usable).
FILE_PATH = st.binary(max_size=40).map(
    lambda raw: "/" + raw.replace(b"\n", b"").decode("utf-8", "surrogateescape")
)
SPECIAL_PATH = st.sampled_from(
    ["", "[heap]", "[stack]", "[vdso]", "[vvar]", "[vsyscall]", "[anon:jit code]"]
)


# A file name with a carriage return: only "\n" is escaped by the kernel.
CR_IN_PATH = (
    "1000-2000 r-xp 00000000 08:01 7   /lib/a\rb.so",
    Mapping(0x1000, 0x2000, 0, "/lib/a\rb.so", "08:01", 7),
)


@st.composite
def maps_lines(draw: st.DrawFn) -> tuple[str, Mapping]:
    """A maps line in the kernel's format and the Mapping it stands for."""
    start, end, offset, inode = draw(U64), draw(U64), draw(U64), draw(U64)
    perms, dev = draw(PERMS), draw(DEV)
    path = draw(st.one_of(FILE_PATH, SPECIAL_PATH))
    deleted = path.startswith("/") and draw(st.booleans())
    if path.endswith(DELETED_SUFFIX) and not deleted:
        path += "x"  # a live file literally named "... (deleted)" is indistinguishable
    head = f"{start:08x}-{end:08x} {perms} {offset:08x} {dev} {inode} "
    shown = path + (DELETED_SUFFIX if deleted else "")
    line = head + " " * max(0, 73 - len(head)) + shown if shown else head
    expected = Mapping(start, end, offset, path, dev, inode, perms)
    return line, expected


@fuzz_settings(400)
@given(any_text)
@example("00400000-00452000 r-xp 00000000 08:02 173521")
@example("zz-00 r-xp 0 0 0 /x")
def test_parse_maps_line_never_raises(line: str) -> None:
    mapping = parse_maps_line(line)
    assert mapping is None or isinstance(mapping, Mapping)


@fuzz_settings(200)
@given(st.lists(st.one_of(any_text, maps_lines().map(lambda pair: pair[0])), max_size=8))
def test_parse_maps_never_raises(lines: list[str]) -> None:
    mappings = parse_maps("\n".join(lines))
    assert all(isinstance(m, Mapping) for m in mappings)


@fuzz_settings(400)
@given(maps_lines())
def test_kernel_maps_line_round_trips(pair: tuple[str, Mapping]) -> None:
    line, expected = pair
    assert parse_maps_line(line) == expected
    assert parse_maps_line(line + "\n") == expected


@fuzz_settings(200)
@given(st.lists(maps_lines(), max_size=6))
@example([CR_IN_PATH])
def test_kernel_maps_text_round_trips(pairs: list[tuple[str, Mapping]]) -> None:
    """A whole maps file: one Mapping per line, whatever bytes the paths hold."""
    text = "".join(line + "\n" for line, _ in pairs)
    assert parse_maps(text) == tuple(expected for _, expected in pairs)


def _write_proc(proc: Path, maps: bytes) -> None:
    """A fake /proc/4242 whose maps file holds exactly `maps`."""
    pid_dir = proc / "4242"
    pid_dir.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + ["12345"] + ["0"] * 20  # field 22 (start_time) = 12345
    (pid_dir / "stat").write_text("4242 (fake) " + " ".join(fields) + "\n")
    (pid_dir / "cmdline").write_bytes(b"fake\0")
    (pid_dir / "maps").write_bytes(maps)


@pytest.fixture(scope="module")
def fake_proc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proc")


@fuzz_settings(100)
@given(st.lists(maps_lines(), max_size=6))
@example([CR_IN_PATH])
def test_read_process_keeps_every_path_byte(
    fake_proc: Path, pairs: list[tuple[str, Mapping]]
) -> None:
    """From the bytes of a maps file to Mappings: what the kernel wrote is what we get."""
    raw = b"".join(line.encode("utf-8", "surrogateescape") + b"\n" for line, _ in pairs)
    _write_proc(fake_proc, raw)
    info = read_process(4242, fake_proc)
    assert info is not None
    assert info.mappings == tuple(m for _, m in pairs if "x" in m.perms)


@fuzz_settings(400)
@given(any_text)
@example("1 (a) b")
@example("1 (comm) S" + " 1" * 19 + " 99999" + "9" * 5000)
def test_parse_stat_raises_only_value_error(text: str) -> None:
    try:
        comm, start_time = parse_stat(text)
    except ValueError:
        return
    assert isinstance(comm, str) and isinstance(start_time, int)


COMM = st.text(st.one_of(st.characters(codec=None), st.sampled_from("() \t:")), max_size=15).filter(
    lambda c: "\n" not in c and "\0" not in c
)


@fuzz_settings(300)
@given(COMM, st.integers(1, 2**22), st.integers(0, 2**64 - 1))
def test_stat_line_round_trips(comm: str, pid: int, start_time: int) -> None:
    """comm may hold spaces and parentheses: the last ")" ends it."""
    fields = ["R", *(str(n) for n in range(4, 22)), str(start_time), "0", "0"]
    text = f"{pid} ({comm}) {' '.join(fields)}\n"
    assert parse_stat(text) == (comm, start_time)
