"""compile_in_child against the real kernel: bcc compiles in a child, the parent gets
fds and drives everything with bpf_syscalls (no bcc, no LLVM in the parent).

The end-to-end check runs the parent side in a fresh `python -c` process, so what
the test runner itself imported (conftest imports bcc) cannot hide a bcc import,
and its VmRSS is compared with a process that compiles the same program with bcc
in-process.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sampler import bpf_syscalls as bs
from agent.sampler.compile_parent import (
    BpfCompileError,
    BpfCompileTimeout,
    CompiledProgram,
    compile_in_child,
)
from agent.sampler.compile_worker import MAX_FDS_PER_MESSAGE
from agent.sampler.kernel_headers import find_kernel_headers
from tests.conftest import REPO

pytestmark = pytest.mark.bpf

# Samples per pid (and user stacks) on cpu-clock, a tail call that counts again,
# and a ring buffer of exec'd pids from the sched_process_exec raw tracepoint.
SOURCE = r"""
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

BPF_HASH(counts, u32, u64, 4096);
BPF_HASH(tail_counts, u32, u64, 4096);
BPF_STACK_TRACE(stacks, 1024);
BPF_RINGBUF_OUTPUT(exec_events, 1);
BPF_PROG_ARRAY(jumps, 4);

int on_sample(struct bpf_perf_event_data *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid == 0)
        return 0;
    counts.increment(pid);
    stacks.get_stackid(ctx, BPF_F_USER_STACK);
    jumps.call(ctx, 0);
    return 0;
}

int count_tail(struct bpf_perf_event_data *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    tail_counts.increment(pid);
    return 0;
}

int on_exec(struct bpf_raw_tracepoint_args *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    exec_events.ringbuf_output(&pid, sizeof(pid), 0);
    return 0;
}
"""
PROGRAMS = {"on_sample": "perf_event", "count_tail": "perf_event", "on_exec": "raw_tracepoint"}
FREQUENCY = 99

# The parent side, in a fresh interpreter: compile in a child, attach with syscalls,
# run one CPU-second of busy work, read everything back; print JSON.
PARENT = r"""
import fcntl, json, struct, subprocess, sys, time
config = json.loads(sys.argv[1])
from agent.sampler import bpf_syscalls as bs
from agent.sampler.compile_parent import compile_in_child

compiled = compile_in_child(config["source"], [], config["programs"], env=config["env"],
                            tail_calls={"jumps": {0: "count_tail"}})
perf_fds = []
for cpu in bs.online_cpus():
    perf_fds.append(bs.open_cpu_clock_event(cpu, config["frequency"]))
    bs.attach_perf_event(perf_fds[-1], compiled.programs["on_sample"])
exec_link = bs.raw_tracepoint_open("sched_process_exec", compiled.programs["on_exec"])
ring = compiled.ring_buffer("exec_events")
busy = subprocess.Popen([sys.executable, "-c", config["busy"]])
busy.wait()
exec_pids = []
deadline = time.monotonic() + 30
while busy.pid not in exec_pids and time.monotonic() < deadline:
    exec_pids += [struct.unpack("=I", r)[0] for r in ring.poll(timeout_ms=1000)]
for fd in perf_fds:
    fcntl.ioctl(fd, 0x2401, 0)  # PERF_EVENT_IOC_DISABLE: counts stop growing
def per_pid(name):
    return {struct.unpack("=I", k)[0]: struct.unpack("=Q", v)[0]
            for k, v in compiled.map(name).lookup_batch()}
counts, tails = per_pid("counts"), per_pid("tail_counts")
stacks = compiled.map("stacks").lookup_batch(delete=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "bcc_imported": any(m == "bcc" or m.startswith("bcc.") for m in sys.modules),
    "busy_pid": busy.pid, "exec_pids": exec_pids,
    "busy_count": counts.get(busy.pid, 0), "busy_tail_count": tails.get(busy.pid, 0),
    "stack_entries": len(stacks),
    "stack_tops": [struct.unpack_from("=Q", v)[0] for _, v in stacks],
    "stacks_left": len(compiled.map("stacks").items()),
    "rss_kb": int(status["VmRSS"].split()[0]), "hwm_kb": int(status["VmHWM"].split()[0]),
}))
"""

# The same compile with bcc in-process, as the loader does today.
IN_PROCESS = r"""
import json, os, sys
config = json.loads(sys.argv[1])
os.environ.update(config["env"])
from bcc import BPF
bpf = BPF(text=config["source"].encode())
kinds = {"perf_event": BPF.PERF_EVENT, "raw_tracepoint": BPF.RAW_TRACEPOINT}
for name, kind in config["programs"].items():
    bpf.load_func(name.encode(), kinds[kind])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"rss_kb": int(status["VmRSS"].split()[0])}))
"""

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass\n"


@pytest.fixture(scope="module")
def bcc_env() -> dict[str, str]:
    return find_kernel_headers().bcc_environment()


def _run_script(script: str, config: dict[str, object]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_parent_drives_a_child_compiled_program_without_bcc(
    require_bpf: None, bcc_env: dict[str, str]
) -> None:
    config = {
        "source": SOURCE,
        "programs": PROGRAMS,
        "env": bcc_env,
        "frequency": FREQUENCY,
        "busy": BUSY,
    }
    parent = _run_script(PARENT, config)
    assert parent["bcc_imported"] is False
    assert parent["busy_pid"] in parent["exec_pids"]  # the ring buffer saw its exec
    # One CPU-second at 99 Hz: ~99 samples (cpu-clock counts CPU time, not wall time).
    assert parent["busy_count"] >= 40, parent
    # The child-filled program array ran the tail call on every sample.
    assert parent["busy_tail_count"] == parent["busy_count"]
    assert parent["stack_entries"] > 0 and all(parent["stack_tops"])
    assert parent["stacks_left"] == 0  # stack map: per-key fallback of lookup-and-delete

    in_process = _run_script(IN_PROCESS, config)
    print(
        f"\nVmRSS: parent with compile_in_child {parent['rss_kb'] / 1024:.1f} MiB "
        f"(peak {parent['hwm_kb'] / 1024:.1f} MiB); bcc in-process "
        f"{in_process['rss_kb'] / 1024:.1f} MiB"
    )
    assert parent["hwm_kb"] * 2 < in_process["rss_kb"], (parent, in_process)


# ------------------------------------------------------------ metadata, tail calls


@pytest.fixture(scope="module")
def _compiled_holder() -> Iterator[list[CompiledProgram]]:
    holder: list[CompiledProgram] = []
    yield holder
    for compiled in holder:
        compiled.close()


@pytest.fixture
def compiled(
    require_bpf: None, bcc_env: dict[str, str], _compiled_holder: list[CompiledProgram]
) -> CompiledProgram:
    """SOURCE compiled once, with the child filling jumps[0]; nothing attached."""
    if not _compiled_holder:
        _compiled_holder.append(
            compile_in_child(
                SOURCE, [], PROGRAMS, env=bcc_env, tail_calls={"jumps": {0: "count_tail"}}
            )
        )
    return _compiled_holder[0]


def test_maps_and_programs_come_with_kernel_metadata(compiled: CompiledProgram) -> None:
    described = {
        name: (m.map_type, m.key_size, m.value_size, m.max_entries)
        for name, m in compiled.maps.items()
    }
    assert described == {
        "counts": (bs.BPF_MAP_TYPE_HASH, 4, 8, 4096),
        "tail_counts": (bs.BPF_MAP_TYPE_HASH, 4, 8, 4096),
        "stacks": (bs.BPF_MAP_TYPE_STACK_TRACE, 4, 127 * 8, 1024),
        "exec_events": (bs.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096),
        "jumps": (bs.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 4),
    }
    assert {name: bs.prog_info(fd).prog_type for name, fd in compiled.programs.items()} == {
        "on_sample": 7,
        "count_tail": 7,
        "on_exec": 17,
    }
    assert sorted(compiled.functions) == sorted(PROGRAMS)
    with pytest.raises(KeyError, match="no map 'nope'"):
        compiled.map("nope")


def test_child_fills_the_program_array(compiled: CompiledProgram) -> None:
    jumps = compiled.map("jumps")
    # From user space a program array slot reads as the program's id.
    tail_id = bs.prog_info(compiled.programs["count_tail"]).id
    assert jumps.lookup(struct.pack("=I", 0)) == struct.pack("=I", tail_id)
    assert jumps.lookup(struct.pack("=I", 1)) is None


def test_parent_fills_the_program_array(require_bpf: None, bcc_env: dict[str, str]) -> None:
    with compile_in_child(SOURCE, [], PROGRAMS, env=bcc_env) as program:
        slot = struct.pack("=I", 2)
        assert program.map("jumps").lookup(slot) is None
        program.set_tail_call("jumps", 2, "count_tail")
        tail_id = bs.prog_info(program.programs["count_tail"]).id
        assert program.map("jumps").lookup(slot) == struct.pack("=I", tail_id)
        with pytest.raises(ValueError, match="not a program array"):
            program.set_tail_call("counts", 0, "count_tail")
        with pytest.raises(KeyError, match="was not loaded"):
            program.set_tail_call("jumps", 0, "missing")
        fds = [m.fd for m in program.maps.values()]
    with pytest.raises(OSError):
        bs.map_info(fds[0])  # close() released the fds


# ------------------------------------------------------------ failures


def test_compile_errors_come_back_with_clangs_message(
    require_bpf: None, bcc_env: dict[str, str]
) -> None:
    broken = "int on_sample(void *ctx) { return no_such_symbol + 1; }"
    with pytest.raises(BpfCompileError) as raised:
        compile_in_child(broken, [], {"on_sample": "perf_event"}, env=bcc_env)
    message = str(raised.value)
    assert "BPF compile failed" in message and "Failed to compile BPF module" in message
    assert "use of undeclared identifier 'no_such_symbol'" in message
    assert not isinstance(raised.value, BpfCompileTimeout)


def test_unknown_function_and_verifier_rejection(
    require_bpf: None, bcc_env: dict[str, str]
) -> None:
    with pytest.raises(BpfCompileError, match="Unknown program b'no_such_function'"):
        compile_in_child(SOURCE, [], {"no_such_function": "perf_event"}, env=bcc_env)
    unchecked = (
        "BPF_HASH(values, u32, u64, 1);\n"
        "int on_sample(void *ctx) { u32 k = 0; u64 *v = values.lookup(&k); return *v; }"
    )
    with pytest.raises(BpfCompileError, match="Failed to load BPF program b'on_sample'") as raised:
        compile_in_child(unchecked, [], {"on_sample": "perf_event"}, env=bcc_env)
    assert "invalid mem access" in raised.value.output  # the verifier's log


def test_bad_requests_fail_before_any_child() -> None:
    with pytest.raises(ValueError, match="unknown kind 'xdp_turbo'"):
        compile_in_child(SOURCE, [], {"on_sample": "xdp_turbo"})
    with pytest.raises(ValueError, match="add it to `programs`"):
        compile_in_child(SOURCE, [], PROGRAMS, tail_calls={"jumps": {0: "elsewhere"}})


def test_a_hung_child_is_killed_at_the_timeout(require_bpf: None, tmp_path: Path) -> None:
    # sitecustomize runs at interpreter start-up in the child: it never gets to compile.
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(3600)\n")
    with pytest.raises(BpfCompileTimeout, match="did not finish within 3 s: killed") as raised:
        compile_in_child(SOURCE, [], PROGRAMS, env={"PYTHONPATH": str(tmp_path)}, timeout=3)
    with pytest.raises(ProcessLookupError):
        os.kill(raised.value.pid, 0)  # killed and reaped


def test_more_maps_than_one_message_can_carry(require_bpf: None, bcc_env: dict[str, str]) -> None:
    count = MAX_FDS_PER_MESSAGE + 30  # the child must split its fds over messages
    source = "\n".join(f"BPF_ARRAY(m{i}, u32, 1);" for i in range(count))
    source += "\nint f(void *ctx) { u32 k = 0; u32 *v = m0.lookup(&k); return v ? *v : 0; }\n"
    with compile_in_child(source, [], {"f": "raw_tracepoint"}, env=bcc_env) as program:
        assert sorted(program.maps) == sorted(f"m{i}" for i in range(count))
        ids = {bs.map_info(m.fd).id for m in program.maps.values()}
        assert len(ids) == count  # distinct live kernel maps
        assert bs.prog_info(program.programs["f"]).prog_type == 17
