"""Pure parsers for /proc/PID/maps and /proc/PID/stat text.

Kept free of I/O so every odd line a host can produce (spaces in paths, deleted
files, anonymous executable memory, comm with parentheses) is tested directly.
"""

from __future__ import annotations

from agent.model import Mapping

DELETED_SUFFIX = " (deleted)"


def parse_maps_line(line: str) -> Mapping | None:
    """One maps line -> Mapping, or None when the line is not a mapping.

    The path is everything after the inode column, so paths with spaces survive.
    A " (deleted)" suffix is removed from file paths: the binary resolver verifies
    file identity (dev + inode) anyway, and falls back to map_files for deleted files.
    """
    return _mapping_of(line.split(None, 5))


def _mapping_of(parts: list[str]) -> Mapping | None:
    """A maps line split into at most six fields -> Mapping (see parse_maps_line)."""
    if len(parts) < 5:
        return None
    address, perms, offset, dev, inode = parts[:5]
    start_text, dash, end_text = address.partition("-")
    if not dash:
        return None
    try:
        start, end = int(start_text, 16), int(end_text, 16)
        file_offset, inode_number = int(offset, 16), int(inode)
    except ValueError:
        return None
    path = parts[5].rstrip("\n").lstrip(" ") if len(parts) == 6 else ""
    if path.startswith("/") and path.endswith(DELETED_SUFFIX):
        path = path[: -len(DELETED_SUFFIX)]
    return Mapping(
        start=start,
        end=end,
        offset=file_offset,
        path=path,
        dev=dev,
        inode=inode_number,
        perms=perms,
    )


def parse_maps(text: str) -> tuple[Mapping, ...]:
    """All mappings of a /proc/PID/maps text, in file order (ascending addresses)."""
    # Only "\n" ends a line: the kernel escapes it in paths (as "\012") but no other
    # character, so splitlines() would cut paths holding "\r", "\x0b", "\x85", ...
    mappings = (parse_maps_line(line) for line in text.split("\n"))
    return tuple(m for m in mappings if m is not None)


def parse_executable_maps(text: str) -> tuple[Mapping, ...]:
    """The executable mappings of a maps text (those an instruction pointer can fall in):
    parse_maps() filtered on "x" in perms, without building the others (a process maps
    several times more data than code)."""
    mappings = []
    for line in text.split("\n"):
        parts = line.split(None, 5)
        if len(parts) >= 5 and "x" in parts[1]:
            mapping = _mapping_of(parts)
            if mapping is not None:
                mappings.append(mapping)
    return tuple(mappings)


def parse_stat(text: str) -> tuple[str, int]:
    """(comm, start_time) from /proc/PID/stat.

    comm sits between the first "(" and the LAST ")" because it may itself contain
    spaces and parentheses; start_time is field 22 (clock ticks since boot).
    Raises ValueError on text that is not a stat line.
    """
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError("stat line without (comm)")
    comm = text[open_paren + 1 : close_paren]
    # Fields after comm start at field 3 (state); start_time is field 22.
    rest = text[close_paren + 1 :].split()
    start_time_index = 22 - 3
    if len(rest) <= start_time_index:
        raise ValueError("stat line too short")
    return comm, int(rest[start_time_index])
