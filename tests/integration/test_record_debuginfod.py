"""`strobe record` names a stripped binary's frames from a real debuginfod server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.integration.test_cli import leaf_functions, strobe
from tests.symbolize.debuginfod_server import Split


def test_record_names_a_stripped_binary_from_debuginfod(
    require_bpf: None, split: Split, debuginfod_url: str, tmp_path: Path
) -> None:
    workload = subprocess.Popen([str(split.local), "30"])
    try:
        output = tmp_path / "stripped.pb.gz"
        result = strobe(
            "record",
            "--duration",
            "3",
            "--frequency",
            "199",
            "--pid",
            str(workload.pid),
            "-o",
            str(output),
            cache=tmp_path / "cache",
            env={"DEBUGINFOD_URLS": debuginfod_url},
        )
        assert result.returncode == 0, result.stderr
    finally:
        workload.kill()
        workload.wait()
    assert "Traceback" not in result.stderr, result.stderr
    leaves, _, total = leaf_functions(output, workload.pid)
    assert total > 50, (total, leaves)
    # The stripped file has no symbol table: only the downloaded debug file names this.
    assert leaves["inner_spin"] / total > 0.8, leaves
    assert list((tmp_path / "cache" / "debuginfod").rglob("debuginfo")), os.listdir(tmp_path)
