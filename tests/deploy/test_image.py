"""The container image: built with podman from the Dockerfile, it profiles a host process.

Run alone with `pytest tests/deploy/test_image.py`. The first run on a machine makes the
Debian base image with debootstrap (about 30 s, then cached as a podman image); the agent
image build takes about 1-2 minutes from scratch, seconds when its layers are cached.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.pprof.builder import parse_pprof
from tests.conftest import REPO
from tests.deploy.podman import AGENT_CAPS, CONTAINERS_CONF, HOST_HEADERS, podman_env

DOCS = REPO / "docs" / "deploy.md"
DOCKERFILE = REPO / "Dockerfile"
# podman run options that take a value (as `--opt=value` or `--opt value`).
PODMAN_VALUE_OPTIONS = {
    "--name", "--pid", "--uts", "--network", "--cap-drop", "--cap-add", "--security-opt",
    "--ulimit", "-v", "--volume", "-e", "--env",
}  # fmt: skip


def run_agent(image: str, args: list[str], podman: list[str]) -> subprocess.CompletedProcess[str]:
    command = [
        "podman",
        "run",
        "--rm",
        "--pid=host",
        "--cap-drop=all",
        f"--cap-add={AGENT_CAPS}",
        "--security-opt=seccomp=unconfined",
        # As in the Helm chart: a read-only root; /tmp, /run (tmpfs) and the image's
        # volumes /var/lib/strobe and /var/cache/strobe stay writable.
        "--read-only",
        *podman,
        image,
        *args,
    ]
    return subprocess.run(command, env=podman_env(), capture_output=True, text=True, timeout=300)


def documented_run(text: str) -> list[str]:
    """The first `podman run -d` command in `text` (comment markers and line continuations
    removed), as argv."""
    lines = [re.sub(r"^#( |$)", "", line) for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("podman run -d"))
    command = []
    for line in lines[start:]:
        command.append(line.strip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(command))


def split_podman_run(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(options as (name, value) pairs, [image, *command]) of a `podman run ...` argv."""
    assert argv[:2] == ["podman", "run"], argv
    options: list[tuple[str, str]] = []
    rest = iter(argv[2:])
    for word in rest:
        if not word.startswith("-"):
            return options, [word, *rest]
        name, sep, value = word.partition("=")
        if not sep and name in PODMAN_VALUE_OPTIONS:
            value = next(rest)
        options.append((name, value))
    raise AssertionError(f"no image in {argv}")


def containers_conf_ulimits() -> set[str]:
    conf = tomllib.loads(CONTAINERS_CONF.read_text())
    return set(conf["containers"]["default_ulimits"])


def test_documented_run_commands_are_the_tested_ones() -> None:
    """docs/deploy.md and the Dockerfile header give one command, with the capabilities and
    settings this file runs the agent with, the ulimits of containers.conf (without which
    runc fails here: "error setting rlimit type 7"), and the host's UTS namespace (the `node`
    label is the host's name, not the container's random one)."""
    docs = documented_run(DOCS.read_text())
    header = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    assert documented_run(header) == docs
    options, (image, *command) = split_podman_run(docs)
    assert (image, command) == ("localhost/strobe:latest", ["run"])
    values: dict[str, list[str]] = {}
    for name, value in options:
        values.setdefault(name, []).append(value)
    assert values["--cap-drop"] == ["all"]
    (caps,) = values["--cap-add"]
    assert set(caps.split(",")) == set(AGENT_CAPS.split(","))
    assert values["--security-opt"] == ["seccomp=unconfined"]
    assert "--read-only" in values and "--privileged" not in values
    assert values["--pid"] == ["host"] and values["--uts"] == ["host"]
    assert set(values["--ulimit"]) == containers_conf_ulimits()
    mounts = set(values["-v"])
    assert {"/lib/modules:/lib/modules:ro", "/usr/src:/usr/src:ro"} <= mounts
    assert "/sys/fs/cgroup:/sys/fs/cgroup:ro" in mounts


def test_build_without_a_registry_suggests_local_base(tmp_path: Path) -> None:
    """When debian:bookworm-slim cannot be pulled, the script stops before building and
    names the --local-base command (a stand-in podman that reaches no registry)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "podman"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$1 $2" in\n'
        '  "image exists") exit 1 ;;\n'
        '  "pull "*) echo "Error: initializing source docker://$2: pinging container'
        ' registry registry-1.docker.io: no such host" >&2; exit 125 ;;\n'
        "esac\n"
        "exit 0\n"
    )
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh"), "--tag", "localhost/strobe:x"],
        env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "pinging container registry" in result.stderr  # podman's own error stays visible
    assert "--local-base --tag localhost/strobe:x" in result.stderr, result.stderr
    assert not any(line.startswith("build ") for line in calls.read_text().splitlines())


@pytest.fixture
def host_spin(c_binaries: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A host process burning CPU in main -> outer_function -> inner_spin."""
    proc = subprocess.Popen([str(c_binaries / "spin_pie"), "120"])
    time.sleep(0.2)  # let it map its libraries
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def gnu_build_id(path: Path) -> str:
    notes = subprocess.run(
        ["readelf", "-n", str(path)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert match, f"{path} has no GNU build id"
    return match.group(1)


def test_image_runs_the_installed_agent(require_bpf: None, image: str) -> None:
    result = subprocess.run(
        ["podman", "run", "--rm", image, "--version"],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"strobe \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


def test_container_profiles_a_host_process(
    require_bpf: None,
    image: str,
    host_spin: subprocess.Popen[bytes],
    c_binaries: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["record", "--duration", "3", "--pid", str(host_spin.pid), "--output", "/out/p.pb.gz"]
    result = run_agent(image, args, [*HOST_HEADERS, "-v", f"{out}:/out"])
    assert result.returncode == 0, result.stderr
    assert host_spin.poll() is None, "the workload must still be running"
    profile = parse_pprof((out / "p.pb.gz").read_bytes())
    strings = profile.string_table
    functions = {strings[f.name] for f in profile.function}
    assert {"inner_spin", "outer_function", "main"} <= functions, functions
    # The binary is read through the host process's /proc/PID/root (or map_files): the
    # mapping carries the build id of the file on the host.
    spin = str(c_binaries / "spin_pie")
    mapping_ids = {strings[m.build_id] for m in profile.mapping if strings[m.filename] == spin}
    assert mapping_ids == {gnu_build_id(c_binaries / "spin_pie")}, mapping_ids


def test_image_headers_are_the_fallback(require_bpf: None, image: str, tmp_path: Path) -> None:
    """Without the host's /lib/modules and /usr/src, the image's own Debian headers serve."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["record", "--duration", "1", "--output", "/out/p.pb.gz"]
    result = run_agent(image, args, ["-v", f"{out}:/out"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"kernel headers: using /usr/src/linux-headers-\S+-amd64", result.stderr)
    parse_pprof((out / "p.pb.gz").read_bytes())


def test_the_documented_command_runs_as_written(
    require_bpf: None, image: str, tmp_path: Path
) -> None:
    """docs/deploy.md's `podman run` as is (only the image, the state directory and the
    command swapped for a short record), under runc with podman's default ulimits (no
    default_ulimits from containers.conf): it starts, and the node label is the host's."""
    options, _ = split_podman_run(documented_run(DOCS.read_text()))
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    out.mkdir()
    argv = ["podman", "run", "--rm"]
    for name, value in options:
        if name in ("-d", "--name"):
            continue
        if name == "-v" and value == "/var/lib/strobe:/var/lib/strobe":
            value = f"{state}:/var/lib/strobe"
        argv.append(f"{name}={value}" if value else name)
    argv += ["-v", f"{out}:/out", image, "record", "--duration", "2", "--frequency", "99"]
    argv += ["--output", "/out/p.pb.gz"]
    runc_only = tmp_path / "containers.conf"
    runc_only.write_text('[engine]\nruntime = "runc"\n')
    # A busy host process: a quiet CI machine may give no sample at all in 2 s.
    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        result = subprocess.run(
            argv,
            env={**os.environ, "CONTAINERS_CONF": str(runc_only)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        busy.kill()
        busy.wait()
    assert result.returncode == 0, result.stderr
    profile = parse_pprof((out / "p.pb.gz").read_bytes())
    assert len(profile.sample) > 0, result.stderr
    strings = profile.string_table
    nodes = {
        strings[label.str]
        for sample in profile.sample
        for label in sample.label
        if strings[label.key] == "node"
    }
    assert nodes == {socket.gethostname()}, nodes
