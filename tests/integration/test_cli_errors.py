"""What a user sees when something is wrong: one line naming the fix, a non-zero exit
code, no traceback, nothing sampled in vain and nothing left behind."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import REPO, require_tool
from tests.integration.test_cli import STROBE, strobe

USAGE_ERROR = 2  # argparse's code, also used for configuration errors


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr (asserting there is exactly one, and no traceback)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_missing_output_directory_refused_before_sampling(tmp_path: Path) -> None:
    missing = tmp_path / "missing-dir"
    started = time.monotonic()
    result = strobe("record", "--duration", "60", "-o", str(missing / "x.pb.gz"), timeout=30)
    assert time.monotonic() - started < 20  # refused up front, not after 60 s of sampling
    assert result.returncode == USAGE_ERROR
    assert one_line(result) == (
        f"strobe: configuration error: flag --output: directory {missing} does not exist; "
        "create it or write elsewhere"
    )
    assert not missing.exists()


def test_directory_as_output_refused_and_nothing_left_behind(tmp_path: Path) -> None:
    result = strobe("record", "--duration", "60", "-o", str(tmp_path), timeout=30)
    assert result.returncode == USAGE_ERROR
    assert one_line(result) == (
        f"strobe: configuration error: flag --output: {tmp_path} is a directory; "
        f"give a file name, e.g. {tmp_path / 'profile.pb.gz'}"
    )
    assert list(tmp_path.iterdir()) == []


def test_missing_flamegraph_directory_refused_before_sampling(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = strobe(
        "record",
        "--duration",
        "60",
        "-o",
        str(tmp_path / "ok.pb.gz"),
        "--flamegraph",
        str(missing / "f.svg"),
        timeout=30,
    )
    assert result.returncode == USAGE_ERROR
    assert one_line(result).startswith(
        f"strobe: configuration error: flag --flamegraph: directory {missing} does not exist"
    )
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory_refused(tmp_path: Path) -> None:
    # tmp_path's ancestors are root-only: the unprivileged user needs one it can enter.
    readonly = Path(tempfile.mkdtemp(prefix="strobe-readonly-"))
    try:
        readonly.chmod(0o755)  # nobody may enter it, not write in it
        result = strobe(
            "record", "--duration", "60", "-o", str(readonly / "x.pb.gz"), timeout=30, user=True
        )
        assert list(readonly.iterdir()) == []
    finally:
        shutil.rmtree(readonly)
    assert result.returncode == USAGE_ERROR
    assert one_line(result) == (
        f"strobe: configuration error: flag --output: cannot write in {readonly} "
        "(Permission denied); choose a writable directory"
    )


def test_read_only_output_directory_refused_even_for_root(tmp_path: Path) -> None:
    """Root passes access() checks on a read-only mount: the check makes a real file."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], check=True)
    try:
        result = strobe("record", "--duration", "60", "-o", str(mount / "x.pb.gz"), timeout=30)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert result.returncode == USAGE_ERROR
    assert one_line(result) == (
        f"strobe: configuration error: flag --output: cannot write in {mount} "
        "(Read-only file system); choose a writable directory"
    )


def test_output_under_a_directory_we_cannot_enter_refused(tmp_path: Path) -> None:
    hidden = tmp_path / "x.pb.gz"  # tmp_path's ancestors are mode 0700, owned by root
    result = strobe("record", "--duration", "60", "-o", str(hidden), timeout=30, user=True)
    assert result.returncode == USAGE_ERROR
    assert one_line(result) == (
        f"strobe: configuration error: flag --output: cannot reach {hidden} "
        "(permission denied); choose a writable directory"
    )


def vanished_pid() -> int:
    """The pid of a process that has exited and been reaped (so no process has it now)."""
    child = subprocess.Popen(["true"])
    child.wait()
    assert not Path(f"/proc/{child.pid}").exists()
    return child.pid


def test_record_of_a_missing_pid_refused(tmp_path: Path) -> None:
    pid = vanished_pid()
    output = tmp_path / "x.pb.gz"
    result = strobe("record", "--duration", "60", "--pid", str(pid), "-o", str(output), timeout=30)
    assert result.returncode == USAGE_ERROR
    assert (
        one_line(result) == f"strobe: configuration error: flag --pid: process {pid} does not exist"
    )
    assert not output.exists()


def test_top_of_a_missing_pid_refused() -> None:
    pid = vanished_pid()
    result = strobe("top", "--pid", str(pid), "--iterations", "1", timeout=30)
    assert result.returncode == USAGE_ERROR
    assert (
        one_line(result) == f"strobe: configuration error: flag --pid: process {pid} does not exist"
    )


PRIVILEGE_FIX = (
    "run as root or grant CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE, "
    "CAP_DAC_READ_SEARCH, CAP_SYSLOG, and in a container seccomp unconfined "
    "(see docs/deploy.md)"
)


def last_line_without_traceback(result: subprocess.CompletedProcess[str]) -> str:
    """The error line (info logs may come before it); the run shows no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.splitlines()[-1]


def world_writable_dir() -> Path:
    """A directory the unprivileged user can write in (tmp_path's ancestors are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="strobe-nobody-"))
    path.chmod(0o1777)
    return path


def test_not_root_default_cache_dir_says_how_to_get_privileges(require_bpf: None) -> None:
    out = world_writable_dir()
    try:
        result = strobe("record", "--duration", "2", "-o", str(out / "x.pb.gz"), user=True)
    finally:
        shutil.rmtree(out)
    assert result.returncode == 1
    line = last_line_without_traceback(result)
    assert line.startswith("strobe: not permitted to use /var/cache"), result.stderr
    assert line.endswith(f": {PRIVILEGE_FIX}")


def test_not_root_bpf_says_how_to_get_privileges(require_bpf: None) -> None:
    out = world_writable_dir()
    try:
        result = strobe(
            "record", "--duration", "2", "-o", str(out / "x.pb.gz"), cache=out / "c", user=True
        )
        assert not (out / "x.pb.gz").exists()
    finally:
        shutil.rmtree(out)
    assert result.returncode == 1
    line = last_line_without_traceback(result)
    assert line == f"strobe: not permitted to load the BPF sampler: {PRIVILEGE_FIX}"


def record_without_headers(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`strobe record` in a private mount namespace where /lib/modules and /usr/src are
    empty, with a fresh cache so no compiled program spares the compile."""
    hide = 'mount -t tmpfs none /lib/modules && mount -t tmpfs none /usr/src && exec "$@"'
    command = [*STROBE, "record", "--duration", "2", "-o", str(tmp_path / "x.pb.gz")]
    return subprocess.run(
        [require_tool("unshare"), "--mount", "sh", "-c", hide, "sh", *command]
        + ["--cache-dir", str(tmp_path / "cache"), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_kernel_headers_is_one_line_with_the_fix(require_bpf: None, tmp_path: Path) -> None:
    result = record_without_headers(tmp_path)
    assert result.returncode == 1, result.stderr
    line = last_line_without_traceback(result)
    assert line.startswith("strobe: no kernel headers for kernel "), result.stderr
    assert line.endswith("mount the host's /lib/modules and /usr/src read-only.")
    assert not (tmp_path / "x.pb.gz").exists()


def test_debug_log_level_keeps_the_traceback(require_bpf: None, tmp_path: Path) -> None:
    result = record_without_headers(tmp_path, "--log-level", "debug")
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "KernelHeadersError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("strobe: no kernel headers")


def test_unusable_cache_dir_is_one_line_before_any_work(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    for cache, why in ((a_file, "not a directory"), (Path("/proc/strobe-nope"), "No such file")):
        output = tmp_path / "x.pb.gz"
        result = strobe("record", "--duration", "5", "-o", str(output), "--cache-dir", str(cache))
        assert result.returncode == USAGE_ERROR
        line = one_line(result)
        assert line.startswith(f"strobe: configuration error: cache_dir: cannot use {cache}: ")
        assert why in line and "--cache-dir" in line
        assert not output.exists()
