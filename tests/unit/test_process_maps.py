"""Pure parsers of /proc/PID/maps and /proc/PID/stat on real-format lines."""

from __future__ import annotations

import pytest

from agent.model import Mapping
from agent.process.maps import parse_maps, parse_maps_line, parse_stat

# Real lines; the kernel ends anonymous lines with a space after the inode.
MAPS = "".join(
    line + "\n"
    for line in [
        "55b9658dd000-55b9658df000 r--p 00000000 fe:00 260131                     /usr/bin/cat",
        "55b9658df000-55b9658e4000 r-xp 00002000 fe:00 260131                     /usr/bin/cat",
        "55b96b110000-55b96b131000 rw-p 00000000 00:00 0                          [heap]",
        "7f5583c51000-7f5583c73000 rw-p 00000000 00:00 0 ",
        "7f5583cfc000-7f5583e52000 r-xp 00026000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6",  # noqa: E501
        "7f5583e60000-7f5583e61000 rwxp 00000000 00:00 0 ",
        "7f5583e70000-7f5583e72000 r-xp 00001000 103:02 1234567                   /opt/my app/bin/run me",  # noqa: E501
        "7f5583e80000-7f5583e82000 r-xp 00003000 fe:00 777                        /tmp/gone (deleted)",  # noqa: E501
        "7f5583ec7000-7f5583ec9000 r-xp 00000000 00:00 0                          [vdso]",
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
    ]
)


def test_parses_every_line_in_order() -> None:
    mappings = parse_maps(MAPS)
    assert len(mappings) == 10
    assert [m.start for m in mappings] == sorted(m.start for m in mappings)


def test_file_mapping_fields() -> None:
    text = parse_maps(MAPS)[1]
    assert text == Mapping(
        start=0x55B9658DF000,
        end=0x55B9658E4000,
        offset=0x2000,
        path="/usr/bin/cat",
        dev="fe:00",
        inode=260131,
        perms="r-xp",
    )


def test_special_and_anonymous_mappings() -> None:
    by_start = {m.start: m for m in parse_maps(MAPS)}
    heap = by_start[0x55B96B110000]
    assert (heap.path, heap.inode, heap.perms) == ("[heap]", 0, "rw-p")
    anonymous = by_start[0x7F5583C51000]
    assert anonymous.path == "" and anonymous.inode == 0
    jit = by_start[0x7F5583E60000]
    assert (jit.path, jit.perms) == ("", "rwxp")  # anonymous executable memory
    vdso = by_start[0x7F5583EC7000]
    assert (vdso.path, vdso.offset, vdso.end - vdso.start) == ("[vdso]", 0, 0x2000)
    assert by_start[0xFFFFFFFFFF600000].path == "[vsyscall]"


def test_path_with_spaces_and_large_device_numbers() -> None:
    mapping = parse_maps(MAPS)[6]
    assert mapping.path == "/opt/my app/bin/run me"
    assert (mapping.dev, mapping.inode, mapping.offset) == ("103:02", 1234567, 0x1000)


def test_deleted_suffix_is_removed_from_file_paths() -> None:
    mapping = parse_maps(MAPS)[7]
    assert mapping.path == "/tmp/gone"
    assert mapping.inode == 777  # identity still identifies the deleted file


@pytest.mark.parametrize(
    "line",
    ["", "garbage", "zzzz-1000 r-xp 0 fe:00 1 /x", "1000 r-xp 00000000 fe:00 1 /x"],
)
def test_malformed_lines_are_skipped(line: str) -> None:
    assert parse_maps_line(line) is None
    assert parse_maps(MAPS + line + "\n") == parse_maps(MAPS)


def test_stat_simple() -> None:
    text = "5555 (cat) R 5550 5550 3459 0 -1 4194304 99 0 0 0 0 0 0 0 20 0 1 0 132433 3133440 378"
    assert parse_stat(text) == ("cat", 132433)


def test_stat_comm_with_spaces_and_parentheses() -> None:
    # A process can name itself "(a) b)": comm ends at the LAST ")".
    fields = " S 1 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0"
    assert parse_stat("42 ((a) b)" + fields) == ("(a) b", 987654)
    assert parse_stat("43 (x) y (z)" + fields) == ("x) y (z", 987654)


@pytest.mark.parametrize("text", ["", "12 cat R", "12 (cat) R 1 2 3"])
def test_stat_malformed_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(text)
