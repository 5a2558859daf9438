"""The compiled-program cache against the real kernel: a miss compiles (bcc, in a
child) and stores; a hit loads with plain bpf() calls, and the programs run; a corrupt
entry, an entry for other inputs, one the verifier refuses and a different kernel are
each rebuilt, and the log says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path

import pytest

from agent.sampler import bpf_syscalls as bs
from agent.sampler import program_cache
from agent.sampler.compile_parent import CompiledProgram
from agent.sampler.kernel_headers import HeaderChoice, find_kernel_headers
from agent.sampler.program_cache import ProgramCache, cache_key, compile_or_load
from tests.bpf.test_compile_parent import PROGRAMS, SOURCE

pytestmark = pytest.mark.bpf
TAIL_CALLS = {"jumps": {0: "count_tail"}}


@pytest.fixture(scope="module")
def headers() -> HeaderChoice:
    return find_kernel_headers()


def load(directory: Path, headers: HeaderChoice, source: str = SOURCE) -> CompiledProgram:
    return compile_or_load(source, [], PROGRAMS, TAIL_CALLS, headers, directory, 60.0)


def key_of(headers: HeaderChoice, source: str = SOURCE) -> str:
    return cache_key(source, [], PROGRAMS, TAIL_CALLS, f"{headers.source}|{headers.path}")


def outcome(caplog: pytest.LogCaptureFixture) -> str:
    messages = [r.getMessage() for r in caplog.records if r.name == program_cache.__name__]
    caplog.clear()
    return " / ".join(messages)


def runs_and_counts(compiled: CompiledProgram) -> int:
    """Attach on_sample to this process's cpu-clock, spin, and read what it counted."""
    fds = []
    for cpu in bs.online_cpus():
        fd = bs.open_cpu_clock_event(cpu, 999, pid=os.getpid())
        bs.attach_perf_event(fd, compiled.programs["on_sample"])
        fds.append(fd)
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
    finally:
        for fd in fds:
            os.close(fd)
    counts = compiled.map("counts").lookup(struct.pack("=I", os.getpid()))
    tail = compiled.map("tail_counts").lookup(struct.pack("=I", os.getpid()))
    assert tail is not None, "the tail call did not run"
    return struct.unpack("=Q", counts)[0] if counts else 0


def test_a_miss_compiles_and_a_hit_loads_without_a_compiler(
    require_bpf: None, tmp_path: Path, headers: HeaderChoice, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=program_cache.__name__)
    with load(tmp_path, headers) as compiled:
        assert "no entry" in outcome(caplog)
        assert compiled.recipe is not None
    assert ProgramCache(tmp_path).path_of(key_of(headers)).is_file()
    started = time.monotonic()
    with load(tmp_path, headers) as cached:
        seconds = time.monotonic() - started
        assert "loaded entry" in outcome(caplog)
        assert {n: bs.prog_info(fd).prog_type for n, fd in cached.programs.items()} == {
            "on_sample": 7,
            "count_tail": 7,
            "on_exec": 17,
        }
        assert runs_and_counts(cached) > 100  # ~500 samples at 999 Hz of spinning
    assert seconds < 1.0, seconds  # a compile takes seconds; generous for a busy machine


def test_a_corrupt_entry_is_rebuilt(
    require_bpf: None, tmp_path: Path, headers: HeaderChoice, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=program_cache.__name__)
    load(tmp_path, headers).close()
    path = ProgramCache(tmp_path).path_of(key_of(headers))
    path.write_bytes(path.read_bytes()[:500])  # torn write
    caplog.clear()
    with load(tmp_path, headers) as compiled:
        assert "corrupt" in outcome(caplog)
        assert runs_and_counts(compiled) > 100
    assert json.loads(path.read_bytes())["key"] == key_of(headers)  # stored again


def test_an_entry_the_verifier_refuses_is_rebuilt(
    require_bpf: None, tmp_path: Path, headers: HeaderChoice, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=program_cache.__name__)
    load(tmp_path, headers).close()
    path = ProgramCache(tmp_path).path_of(key_of(headers))
    document = json.loads(path.read_bytes())
    program = document["entry"]["recipe"]["programs"]["on_sample"]
    program["insns"] = "ff" * 8 + program["insns"][16:]  # an invalid opcode, checksum kept valid
    body = json.dumps(document["entry"], sort_keys=True)
    document["sha256"] = hashlib.sha256(body.encode()).hexdigest()
    path.write_text(json.dumps(document))
    caplog.clear()
    with load(tmp_path, headers) as compiled:
        assert "refused" in outcome(caplog)
        assert runs_and_counts(compiled) > 100


def test_other_inputs_miss(
    require_bpf: None,
    tmp_path: Path,
    headers: HeaderChoice,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger=program_cache.__name__)
    load(tmp_path, headers).close()
    changed = SOURCE.replace("4096", "2048")  # the source changed: a new key, a compile
    assert key_of(headers, changed) != key_of(headers)
    caplog.clear()
    with load(tmp_path, headers, changed) as compiled:
        assert "no entry" in outcome(caplog)
        assert compiled.maps["counts"].max_entries == 2048
    # An entry renamed into another key's place is for other inputs.
    cache = ProgramCache(tmp_path)
    os.replace(cache.path_of(key_of(headers, changed)), cache.path_of(key_of(headers)))
    caplog.clear()
    with load(tmp_path, headers) as compiled:
        assert "for other inputs" in outcome(caplog)
        assert compiled.maps["counts"].max_entries == 4096
    # Another kernel: another key.
    monkeypatch.setattr(program_cache.platform, "release", lambda: "6.99.0-other")
    assert key_of(headers) not in {p.stem for p in tmp_path.iterdir()}
    caplog.clear()
    load(tmp_path, headers).close()
    assert "no entry" in outcome(caplog)
