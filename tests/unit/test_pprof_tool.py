"""The upstream pprof tool (.venv/bin/pprof, built by scripts/setup.sh) reads our profiles."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.pprof import build_pprof
from agent.pprof.proto import profile_pb2
from tests.conftest import require_tool
from tests.unit.test_pprof_builder import DURATION_NS, PERIOD_NS, START_NS, samples

FUNCTIONS = ("do_syscall_64", "entry_SYSCALL_64", "leaf", "spin", "main")


def run_pprof(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    pprof = require_tool("pprof")
    env = {**os.environ, "HOME": str(tmp_path), "PPROF_TMPDIR": str(tmp_path)}
    env.pop("PPROF_BINARY_PATH", None)
    return subprocess.run(
        [pprof, "-symbolize=none", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "cpu.pb.gz"
    path.write_bytes(build_pprof(samples(), START_NS, DURATION_NS, PERIOD_NS))
    return path


@pytest.mark.parametrize("report", ["-raw", "-top", "-traces"])
def test_pprof_reads_the_profile(tmp_path: Path, profile_file: Path, report: str) -> None:
    result = run_pprof(tmp_path, report, str(profile_file))
    assert result.returncode == 0, result.stderr
    for name in FUNCTIONS:
        assert name in result.stdout, f"{name} missing from pprof {report}:\n{result.stdout}"


def test_pprof_raw_shows_mappings_labels_and_inline_order(
    tmp_path: Path, profile_file: Path
) -> None:
    raw = run_pprof(tmp_path, "-raw", str(profile_file)).stdout
    assert "PeriodType: cpu nanoseconds" in raw
    assert f"Period: {PERIOD_NS}" in raw
    assert "samples/count cpu/nanoseconds" in raw
    assert f"3 {3 * PERIOD_NS}:" in " ".join(raw.split())
    assert "comm:[spin]" in raw and "pid:[42]" in raw
    # inline frames: leaf (innermost) printed on the location line, spin after it
    assert raw.index("leaf spin.c:10") < raw.index("spin spin.c:20")
    assert "/usr/bin/spin" in raw and "[kernel.kallsyms]" in raw


def test_pprof_traces_are_root_last(tmp_path: Path, profile_file: Path) -> None:
    traces = run_pprof(tmp_path, "-traces", str(profile_file)).stdout
    first = traces.split("-----------+")[1]
    lines = [line.replace("(inline)", "").split() for line in first.splitlines()[1:]]
    frames = [words[-1] for words in lines if words and not words[0].endswith(":")]
    assert frames == ["do_syscall_64", "entry_SYSCALL_64", "leaf", "spin", "main"], first
    assert "leaf (inline)" in first


def test_pprof_rejects_a_corrupted_file(tmp_path: Path, profile_file: Path) -> None:
    data = bytearray(profile_file.read_bytes())
    truncated = tmp_path / "truncated.pb.gz"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    result = run_pprof(tmp_path, "-raw", str(truncated))
    assert result.returncode != 0
    assert "truncated.pb.gz" in result.stderr


def test_pprof_rejects_dangling_ids(tmp_path: Path) -> None:
    # the validator is real: a sample pointing at a missing location is refused
    profile = profile_pb2.Profile(string_table=["", "samples", "count"])
    profile.sample_type.add(type=1, unit=2)
    profile.sample.add(location_id=[7], value=[1])
    path = tmp_path / "dangling.pb"
    path.write_bytes(profile.SerializeToString())
    result = run_pprof(tmp_path, "-raw", str(path))
    assert result.returncode != 0
