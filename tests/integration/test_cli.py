"""The CLI end to end on the real kernel: `strobe record` and `strobe run`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from elftools.elf.elffile import ELFFile

from agent.pprof.builder import parse_pprof
from tests.conftest import REPO, require_tool

STROBE = [sys.executable, "-m", "agent"]
UNPRIVILEGED = ["--reuid=65534", "--regid=65534", "--clear-groups"]  # nobody, no capabilities


def strobe(
    *args: str,
    timeout: float = 120,
    cache: Path | None = None,
    env: dict[str, str] | None = None,
    user: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI; `user=True` runs it as nobody (no capabilities), via setpriv."""
    environ = {**os.environ, **(env or {})}
    if cache is not None:
        environ["STROBE_CACHE_DIR"] = str(cache)
    prefix = [require_tool("setpriv"), *UNPRIVILEGED] if user else []
    return subprocess.run(
        [*prefix, *STROBE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
    )


def build_id(path: Path) -> str:
    with path.open("rb") as f:
        for section in ELFFile(f).iter_sections():
            if section.header.sh_type == "SHT_NOTE":
                for note in section.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    raise AssertionError("no build id")


def leaf_functions(profile_path: Path, pid: int) -> tuple[Counter[str], int, int]:
    """Samples per leaf function for `pid`, and how many of them reach main."""
    profile = parse_pprof(profile_path.read_bytes())
    strings = profile.string_table
    names = {f.id: strings[f.name] for f in profile.function}
    locations = {loc.id: loc for loc in profile.location}
    leaves: Counter[str] = Counter()
    reach_main = total = 0
    for sample in profile.sample:
        pids = {lab.num for lab in sample.label if strings[lab.key] == "pid"}
        if pids != {pid}:
            continue
        stack = [
            names[line.function_id]
            for loc_id in sample.location_id
            for line in locations[loc_id].line
        ]
        total += sample.value[0]
        if stack:
            leaves[stack[0]] += sample.value[0]
        if "main" in stack:
            reach_main += sample.value[0]
    return leaves, reach_main, total


def test_version() -> None:
    result = strobe("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("strobe ")


def test_run_help_documents_every_flag() -> None:
    result = strobe("run", "--help")
    assert result.returncode == 0
    for flag in ("--frequency", "--window", "--local-store", "--http-address", "--config"):
        assert flag in result.stdout


def test_record_attributes_leaves_in_proportion(
    require_bpf: None, c_binaries: Path, tmp_path: Path
) -> None:
    workload = subprocess.Popen([str(c_binaries / "three_leaves"), "30"])
    try:
        output = tmp_path / "leaves.pb.gz"
        result = strobe(
            "record",
            "--duration",
            "6",
            "--frequency",
            "999",  # ~6,000 samples: binomial noise ~0.7 points against the 5 allowed
            "--pid",
            str(workload.pid),
            "--output",
            str(output),
            cache=tmp_path / "cache",
        )
        assert result.returncode == 0, result.stderr
    finally:
        workload.kill()
        workload.wait()
    leaves, reach_main, total = leaf_functions(output, workload.pid)
    assert total > 200, (total, leaves)
    known = leaves["leaf_fifty"] + leaves["leaf_thirty"] + leaves["leaf_twenty"]
    assert known / total > 0.9, leaves
    for name, share in (("leaf_fifty", 50), ("leaf_thirty", 30), ("leaf_twenty", 20)):
        assert abs(100 * leaves[name] / known - share) <= 5, leaves
    assert reach_main / total > 0.9
    profile = parse_pprof(output.read_bytes())
    strings = profile.string_table
    mapping = next(m for m in profile.mapping if strings[m.filename].endswith("three_leaves"))
    assert strings[mapping.build_id] == build_id(c_binaries / "three_leaves")
    pprof = require_tool("pprof")
    env = {**os.environ, "HOME": str(tmp_path), "PPROF_TMPDIR": str(tmp_path)}
    top = subprocess.run(
        [pprof, "-symbolize=none", "-top", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert top.returncode == 0, top.stderr
    assert "leaf_fifty" in top.stdout


def test_record_names_kernel_frames(require_bpf: None, tmp_path: Path) -> None:
    busy = subprocess.Popen(
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=100000000"], stderr=subprocess.DEVNULL
    )
    try:
        output = tmp_path / "kernel.pb.gz"
        result = strobe(
            "record",
            "--duration",
            "3",
            "--frequency",
            "99",
            "--pid",
            str(busy.pid),
            "--output",
            str(output),
            cache=tmp_path / "cache",
        )
        assert result.returncode == 0, result.stderr
    finally:
        busy.kill()
        busy.wait()
    profile = parse_pprof(output.read_bytes())
    strings = profile.string_table
    kernel_mappings = {m.id for m in profile.mapping if "kernel" in strings[m.filename]}
    kernel_names = {strings[f.name] for f in profile.function}
    kernel_locations = [loc for loc in profile.location if loc.mapping_id in kernel_mappings]
    assert kernel_locations, "no kernel frames"
    assert any(
        name.startswith(("__x64_sys_", "ksys_", "vfs_", "entry_SYSCALL")) for name in kernel_names
    ), sorted(kernel_names)[:40]


def test_run_writes_windows_until_sigterm(require_bpf: None, tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "STROBE_CACHE_DIR": str(tmp_path / "cache")}
    agent = subprocess.Popen(
        [
            *STROBE,
            "run",
            "--window",
            "2s",
            "--local-store",
            str(store),
            "--http-address",
            "127.0.0.1:0",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list(store.glob("*.pb.gz"))) < 2:
            assert agent.poll() is None, agent.communicate()[1]
            time.sleep(0.5)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, stderr
    files = sorted(store.glob("*.pb.gz"))
    assert len(files) >= 2, stderr
    for file in files:
        assert parse_pprof(file.read_bytes()).sample, file


def sidecar_labels(store: Path) -> list[dict[str, str]]:
    import json

    out = []
    for sidecar in sorted(store.glob("*.json")):
        try:
            out.append(json.loads(sidecar.read_text())["labels"])
        except (ValueError, OSError):
            continue  # being written
    return out


def test_sighup_reloads_relabel_configs_and_survives_a_bad_config(
    require_bpf: None, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    config = tmp_path / "strobe.yaml"
    config.write_text(f"window: 2s\nlocal_store: {store}\nhttp_address: 127.0.0.1:0\n")
    log = tmp_path / "strobe.log"
    with log.open("w") as stderr_file:
        agent = subprocess.Popen(
            [*STROBE, "run", "--config", str(config), "--cache-dir", str(tmp_path / "cache")],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
        )
    # Something on CPU throughout, so every window has samples and writes a sidecar.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:

        def windows() -> int:
            return len(list(store.glob("*.json")))

        def wait_for(condition: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not condition():
                assert agent.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            assert condition()

        wait_for(lambda: windows() >= 1)
        config.write_text("frequency: [not valid\n")
        agent.send_signal(signal.SIGHUP)
        # The reload is refused (at a window's end), and the agent goes on: it writes another
        # window after the refusal, on the old configuration.
        wait_for(lambda: "keeping the current configuration" in log.read_text())
        refused_at = windows()
        wait_for(lambda: windows() > refused_at)
        assert agent.poll() is None, "a bad config on reload must not stop the agent"
        config.write_text(
            f"window: 2s\nlocal_store: {store}\nhttp_address: 127.0.0.1:0\n"
            "relabel_configs:\n"
            "  - target_label: team\n"
            "    replacement: profiling\n"
        )
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: any(labels.get("team") == "profiling" for labels in sidecar_labels(store)))
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    finally:
        busy.kill()
        busy.wait()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    stderr = log.read_text()
    assert agent.returncode == 0, stderr
    assert "keeping the current configuration" in stderr


def frame_files(profile_path: Path, function: str) -> set[str]:
    """The source files pprof's Functions named `function` carry ("" when none)."""
    profile = parse_pprof(profile_path.read_bytes())
    strings = profile.string_table
    return {strings[f.filename] for f in profile.function if strings[f.name] == function}


def test_record_symbolizes_for_at_most_symbolize_wait(
    require_bpf: None, c_binaries: Path, tmp_path: Path
) -> None:
    """With no wait the file is written right after sampling, its frames named from ELF
    symbols (DWARF not indexed yet); with the default wait a small binary's DWARF is
    ready and its frames carry files."""
    workload = subprocess.Popen([str(c_binaries / "three_leaves"), "60"])
    cache = tmp_path / "cache"  # nothing indexed yet
    try:
        runs = {}
        for wait in ("0", "5s"):
            output = tmp_path / f"wait-{wait}.pb.gz"
            started = time.monotonic()
            result = strobe(
                "record",
                "--duration",
                "2",
                "--pid",
                str(workload.pid),
                "--symbolize-wait",
                wait,
                "--output",
                str(output),
                cache=cache,
            )
            runs[wait] = time.monotonic() - started
            assert result.returncode == 0, result.stderr
            assert result.stderr.count("Traceback") == 0, result.stderr
    finally:
        workload.kill()
        workload.wait()
    assert frame_files(tmp_path / "wait-0.pb.gz", "leaf_fifty") == {""}  # ELF name only
    assert any(
        f.endswith("three_leaves.c") for f in frame_files(tmp_path / "wait-5s.pb.gz", "leaf_fifty")
    )
    # 2 s of sampling, a cold BPF compile and Python's start-up: far from the 5 s more
    # that DWARF may take, which the first run did not wait for.
    assert runs["0"] < 2 + 12, runs
    bad = strobe("record", "--duration", "1", "--symbolize-wait", "soon", "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--symbolize-wait" in bad.stderr


def test_admin_port_in_use_is_one_line_naming_the_address_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = strobe(
            "run", "--http-address", address, "--local-store", str(tmp_path), cache=tmp_path
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert address in line and "--http-address" in line and "in use" in line


def test_record_samples_at_the_priority_it_was_given(require_bpf: None, tmp_path: Path) -> None:
    """Start-up and symbolizing run raised (a session's autogroup too), but not the
    sampling: a workload started from the same shell would be raised in its own profile."""
    record = subprocess.Popen(
        [*STROBE, "record", "--duration", "4", "-o", str(tmp_path / "p.pb.gz")],
        cwd=REPO,
        env={**os.environ, "STROBE_CACHE_DIR": str(tmp_path / "cache")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its session's autogroup is its own
    )
    try:
        assert record.stderr is not None
        lines = []
        for line in record.stderr:  # the log goes to stderr
            lines.append(line)
            if "start-up ran at a raised priority" in line:
                break  # logged once every thread is back: sampling runs from here
        assert record.poll() is None, "".join(lines)
        autogroup = Path(f"/proc/{record.pid}/autogroup").read_text().split()[-1]
        nices = {
            os.getpriority(os.PRIO_PROCESS, int(tid))
            for tid in os.listdir(f"/proc/{record.pid}/task")
        }
        _, rest = record.communicate(timeout=120)
    finally:
        if record.poll() is None:
            record.kill()
            record.wait()
    assert record.returncode == 0, rest
    assert autogroup == "0" and nices == {os.getpriority(os.PRIO_PROCESS, 0)}, (autogroup, nices)
    assert "start-up ran at a raised priority" in "".join(lines) + rest
