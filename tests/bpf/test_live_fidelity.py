"""Names on a live profile, weighted by samples: a CPU-heavy program under pyenv's
CPython 3.11 and 3.12 (PGO+LTO libpython, hot/cold split `_PyEval_EvalFrameDefault`)
is sampled for real; every leaf address in libpython is named by Strobe and by
`addr2line -f -i -C`, and the shares that agree are counted by samples.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.model import Mapping, ProcessInfo
from agent.process.reader import read_process
from agent.sampler import Sampler
from agent.symbolize.symbolizer import Symbolizer
from tests.bpf.test_unwind import CPU_BOUND
from tests.symbolize.test_addr2line_agreement import (
    Aliases,
    addr2line_batch,
    pyenv_libpython,
    short_name,
)

pytestmark = pytest.mark.bpf
REQUIRED_OUTERMOST, REQUIRED_INNERMOST = 0.99, 0.97


def vaddr_of(library: Path, mapping: Mapping, address: int) -> int:
    """ELF vaddr of a runtime address, from the raw program headers (not the agent's code)."""
    offset = address - mapping.start + mapping.offset
    with open(library, "rb") as f:
        for segment in ELFFile(f).iter_segments():
            h = segment.header
            if h.p_type == "PT_LOAD" and h.p_offset <= offset < h.p_offset + h.p_filesz:
                return int(offset - h.p_offset + h.p_vaddr)
    raise ValueError(f"{address:#x} is in no PT_LOAD of {library}")


def leaf_counts(version: str) -> tuple[Path, ProcessInfo, Counter[int]]:
    """Sample a pyenv CPython running CPU_BOUND; leaf addresses in libpython by samples."""
    library = pyenv_libpython(version)
    python = library.parent.parent / "bin" / f"python{version}"
    with Sampler(frequency=199, unwinder="fp") as sampler:
        sampler.start()
        proc = subprocess.Popen([str(python), "-c", CPU_BOUND, "30"])
        try:
            time.sleep(1.0)
            info = read_process(proc.pid)
            sampler.drain()
            time.sleep(6.0)
            samples = [s for s in sampler.drain().samples if s.pid == proc.pid]
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert info is not None
    leaves: Counter[int] = Counter()
    for sample in samples:
        if sample.user_stack:
            leaves[sample.user_stack[0]] += sample.count
    return library, info, leaves


@pytest.mark.parametrize("version", ["3.11", "3.12"])
def test_a_live_python_profile_names_its_hot_functions_as_addr2line_does(
    require_bpf: None, version: str
) -> None:
    library, info, leaves = leaf_counts(version)
    mappings = [m for m in info.mappings if m.path == str(library)]
    in_library = {a: n for a, n in leaves.items() if any(m.contains(a) for m in mappings)}
    total = sum(in_library.values())
    assert total >= 300, f"only {total} samples in {library}"
    symbolizer = Symbolizer()
    assert symbolizer.prepare(info) >= 1
    vaddrs = {
        a: vaddr_of(library, next(m for m in mappings if m.contains(a)), a) for a in in_library
    }
    theirs = dict(zip(vaddrs, addr2line_batch(library, list(vaddrs.values())), strict=True))
    aliases = Aliases(library)
    outer_agree = inner_agree = 0
    misnamed: Counter[str] = Counter()
    for address, count in in_library.items():
        (location,) = symbolizer.symbolize(info, (address,), ())
        mine = [f.function for f in location.frames]
        truth = [function for function, _, _ in theirs[address]]
        if mine and aliases.same_function(mine[-1], truth[-1], vaddrs[address]):
            outer_agree += count
        else:
            misnamed[f"{mine[-1:]} for {truth[-1]}"] += count
        if mine and short_name(mine[0]) == short_name(truth[0]):
            inner_agree += count
    symbolizer.close()
    assert outer_agree / total >= REQUIRED_OUTERMOST, (outer_agree / total, misnamed.most_common(5))
    assert inner_agree / total >= REQUIRED_INNERMOST, inner_agree / total
