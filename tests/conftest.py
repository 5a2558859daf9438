"""Fixtures shared by more than one test folder (a folder's own are in its conftest.py).

BPF tests need root and a kernel with perf events.

In CI (.ci/run sets STROBE_REQUIRE_BPF=1) a BPF test that cannot run fails instead
of skipping, so a broken environment can never pass as green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge

from tests.symbolize.debuginfod_server import Split, serving

REPO = Path(__file__).resolve().parent.parent
REQUIRE_BPF = os.environ.get("STROBE_REQUIRE_BPF") == "1"


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "BPF tests need root"
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        return f"bcc is not importable: {exc}"
    return None


@pytest.fixture
def require_bpf() -> None:
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"STROBE_REQUIRE_BPF=1 but {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of an external tool; in CI its absence is a failure, not a skip."""
    venv_bin = REPO / ".venv" / "bin" / name
    path = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if path:
        return path
    if REQUIRE_BPF:
        pytest.fail(f"{name} is required in CI; run scripts/setup.sh")
    pytest.skip(f"{name} not installed (run scripts/setup.sh)")


def metric_value(metric: Counter | Gauge, **labels: str) -> float:
    """A counter's or gauge's value for one label set, read through prometheus_client's public
    collect() rather than its private _value. A series not yet touched reads 0.0, as the agent
    exports it; a wrong label name raises."""
    if labels:
        metric.labels(**labels)  # checks the label names (a new series starts at 0)
    (family,) = metric.collect()
    names = (family.name, f"{family.name}_total")  # a counter's sample carries _total
    return next(s.value for s in family.samples if s.name in names and s.labels == labels)


@pytest.fixture(scope="session")
def c_binaries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small C programs compiled once per run: PIE, non-PIE, a shared library."""
    out = tmp_path_factory.mktemp("cbin")
    src = REPO / "tests" / "data" / "c"
    gcc = require_tool("gcc")
    common = ["-O0", "-g", "-fno-omit-frame-pointer"]
    builds = {
        "spin_pie": ["-pie", "-fPIE", str(src / "spin.c")],
        "spin_nopie": ["-no-pie", "-fno-PIE", str(src / "spin.c")],
        "libspin.so": ["-shared", "-fPIC", str(src / "libspin.c")],
        "three_leaves": ["-pie", "-fPIE", str(src / "three_leaves.c")],
        "uses_lib": [str(src / "uses_lib.c"), f"-L{out}", "-lspin", f"-Wl,-rpath,{out}"],
    }
    for name, args in builds.items():  # libspin.so before uses_lib: dicts keep order
        subprocess.run([gcc, *common, "-o", str(out / name), *args], check=True)
    return out


@pytest.fixture
def split(c_binaries: Path, tmp_path: Path) -> Split:
    """spin_pie stripped, with its debug file beside it, both in split.served."""
    objcopy, strip = require_tool("objcopy"), require_tool("strip")
    return Split(c_binaries / "spin_pie", tmp_path / "split", objcopy, strip)


@pytest.fixture
def debuginfod_url(split: Split, tmp_path: Path) -> Iterator[str]:
    """A real debuginfod serving split.served, stopped in teardown."""
    with serving(require_tool("debuginfod"), split, tmp_path / "db.sqlite") as url:
        yield url
