"""Compiled BPF programs on disk, so that a start runs no compiler.

bcc compiles with LLVM: 2-4 s on a quiet machine, 30 s and more beside busy processes.
What it produces is fixed by its inputs, so the first compile's result is kept under
cache_dir/bpf: each map's definition, and each program's instructions as bcc loaded
them, with the instructions that load a map fd named (compile_worker.recipe). A later
start creates the maps and loads the programs with plain bpf() calls: no LLVM, no child.

An entry's file name is a digest of everything that changes the bytecode (the source,
the cflags, the programs and tail calls asked for, bcc's version and library, the
kernel headers chosen, the running kernel's release and this format); its content
carries a checksum. A corrupt entry, one written for other inputs, or one the verifier
refuses is deleted and rebuilt by the compiler, and the log says which.

    entry = cache.load(key)                  # None: miss (or a bad entry, removed)
    compiled = instantiate(entry)            # maps created, programs loaded
    cache.store(key, entry_of(compiled))     # after a compile
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.sampler import bpf_syscalls
from agent.sampler.compile_parent import BpfCompileError, CompiledProgram, MapFd, compile_in_child
from agent.sampler.compile_worker import PROGRAM_KINDS
from agent.sampler.kernel_headers import HeaderChoice

log = logging.getLogger(__name__)

FORMAT = 1
BCC_PACKAGE = Path("/usr/lib/python3/dist-packages/bcc")
LIBBCC = Path("/usr/lib/x86_64-linux-gnu/libbcc.so.0")
IMM = struct.Struct("<i")  # struct bpf_insn's imm, at byte 4
Entry = dict[str, Any]


def cache_key(
    source: str,
    cflags: Sequence[str],
    programs: Mapping[str, str],
    tail_calls: Mapping[str, Mapping[int, str]],
    headers: str,
) -> str:
    """Digest of every input that changes what bcc compiles and loads."""
    inputs = {
        "format": FORMAT,
        "source": source,
        "cflags": list(cflags),
        "programs": dict(programs),
        "tail_calls": {a: {str(i): f for i, f in s.items()} for a, s in tail_calls.items()},
        "bcc": _bcc_identity(),
        "headers": headers,
        "kernel": platform.release(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _bcc_identity() -> str:
    """bcc's version and its library's identity, read without importing bcc (LLVM)."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append((BCC_PACKAGE / "version.py").read_text().strip())
    with contextlib.suppress(OSError):
        st = LIBBCC.stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class ProgramCache:
    """One JSON file per key under `directory`, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_of(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> Entry | None:
        """The entry for key, or None: missing, or unusable (then removed, and logged)."""
        path = self.path_of(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            log.info("BPF program cache: no entry %s: compiling", key)
            return None
        except OSError as exc:
            log.warning("BPF program cache: cannot read %s (%s): compiling", path, exc.strerror)
            return None
        problem = _problem(raw, key)
        if problem:
            log.warning("BPF program cache: entry %s is %s: removed, compiling", key, problem)
            self.discard(key)
            return None
        entry: Entry = json.loads(raw)["entry"]
        return entry

    def store(self, key: str, entry: Entry) -> None:
        """Write the entry (temp file, fsync, rename); a failure only costs the next start."""
        body = json.dumps(entry, sort_keys=True)
        document = {"key": key, "sha256": hashlib.sha256(body.encode()).hexdigest(), "entry": entry}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path_of(key))
        except OSError as exc:
            log.warning("BPF program cache: cannot store %s: %s", key, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(temp)

    def discard(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.path_of(key).unlink()


def _problem(raw: bytes, key: str) -> str:
    """What is wrong with a stored document ("" when nothing)."""
    try:
        document = json.loads(raw)
        body = json.dumps(document["entry"], sort_keys=True)
        if document.get("key") != key:
            return "for other inputs"
        if hashlib.sha256(body.encode()).hexdigest() != document.get("sha256"):
            return "corrupt (checksum)"
        return ""
    except (ValueError, KeyError, TypeError):
        return "corrupt (not a cache document)"


def entry_of(compiled: CompiledProgram, tail_calls: Mapping[str, Mapping[int, str]]) -> Entry:
    """What instantiate() needs, from a program the compile child just loaded."""
    if compiled.recipe is None:
        raise ValueError("the compile child sent no recipe")
    maps = {}
    for name, map_fd in compiled.maps.items():
        info = bpf_syscalls.map_info(map_fd.fd)
        maps[name] = [info.map_type, info.key_size, info.value_size, info.max_entries, info.flags]
    return {
        "maps": maps,
        "recipe": compiled.recipe,
        "functions": list(compiled.functions),
        "tail_calls": {a: {str(i): f for i, f in s.items()} for a, s in tail_calls.items()},
    }


def instantiate(entry: Entry) -> CompiledProgram:
    """Create the entry's maps and load its programs; raises BpfCompileError if the
    kernel refuses any of it (nothing stays open then)."""
    maps: dict[str, MapFd] = {}
    programs: dict[str, int] = {}
    compiled = CompiledProgram(maps, programs, entry["functions"], entry["recipe"])
    try:
        for name, (map_type, key_size, value_size, max_entries, flags) in entry["maps"].items():
            fd = bpf_syscalls.create_map(map_type, key_size, value_size, max_entries, name, flags)
            maps[name] = MapFd(name, fd, map_type, key_size, value_size, max_entries)
        recipe = entry["recipe"]
        for name, program in recipe["programs"].items():
            insns = _with_map_fds(bytes.fromhex(program["insns"]), program["maps"], maps)
            programs[name] = bpf_syscalls.load_program(
                PROGRAM_KINDS[program["kind"]],
                insns,
                recipe["license"],
                name,
                recipe["kern_version"],
            )
        for array, slots in entry["tail_calls"].items():
            for index, function in slots.items():
                compiled.set_tail_call(array, int(index), function)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        compiled.close()
        raise BpfCompileError(f"cached BPF program refused: {exc}") from None
    return compiled


def _with_map_fds(insns: bytes, refs: Mapping[str, str], maps: Mapping[str, MapFd]) -> bytes:
    """The instructions with this process's map fds in the ld_imm64s that load maps."""
    patched = bytearray(insns)
    for index, name in refs.items():
        IMM.pack_into(patched, int(index) * 8 + 4, maps[name].fd)
    return bytes(patched)


def compile_or_load(
    source: str,
    cflags: Sequence[str],
    programs: Mapping[str, str],
    tail_calls: Mapping[str, Mapping[int, str]],
    headers: HeaderChoice,
    directory: Path,
    timeout: float,
) -> CompiledProgram:
    """The program from the cache when an entry for these inputs loads, else compiled
    by bcc in a child (and stored for the next start). The log says which."""
    cache = ProgramCache(directory)
    key = cache_key(source, cflags, programs, tail_calls, f"{headers.source}|{headers.path}")
    entry = cache.load(key)
    if entry is not None:
        try:
            compiled = instantiate(entry)
        except BpfCompileError as exc:
            log.warning("BPF program cache: entry %s refused (%s): removed, compiling", key, exc)
            cache.discard(key)
        else:
            log.info("BPF program cache: loaded entry %s (no compile)", key)
            return compiled
    compiled = compile_in_child(
        source,
        cflags,
        programs,
        env=headers.bcc_environment(),
        timeout=timeout,
        tail_calls=tail_calls,
    )
    try:
        cache.store(key, entry_of(compiled, tail_calls))
    except (OSError, ValueError) as exc:  # the program is loaded; only the next start pays
        log.warning("BPF program cache: cannot store %s: %s", key, exc)
    return compiled
