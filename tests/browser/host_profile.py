"""A synthetic whole-host profile with what makes real ones hard to read: two processes
with one comm, a stripped library unwound into a tower of addresses, kernel stacks, and
a long tail of rarely-seen functions (the grass of narrow frames)."""

from __future__ import annotations

import random

from agent.model import Frame, Location, Mapping, ProfileSample

PYTHON = Mapping(0x550000000000, 0x550000400000, 0, "/usr/bin/python3.11")
LIBC = Mapping(0x7F0000000000, 0x7F0000200000, 0, "/usr/lib/x86_64-linux-gnu/libc.so.6")
STRIPPED = Mapping(0x7F1000000000, 0x7F1000100000, 0, "/opt/vendor/libblob.so")
POSTGRES = Mapping(0x560000000000, 0x560000800000, 0, "/usr/lib/postgresql/15/bin/postgres")


def user(mapping: Mapping, *functions: str, address: int = 0x1000) -> Location:
    return Location(mapping.start + address, mapping, frames=tuple(Frame(f) for f in functions))


def kernel(*functions: str) -> Location:
    frames = tuple(Frame(f) for f in functions)
    return Location(0xFFFFFFFF81000000, None, frames=frames, kernel=True)


def unnamed(mapping: Mapping, address: int) -> Location:
    return Location(mapping.start + address, mapping)


def proc(count: int, pid: int, comm: str, *locations: Location) -> ProfileSample:
    return ProfileSample(locations, count, (("comm", comm), ("pid", str(pid))), pid)


def python_stack(*leaf: Location) -> tuple[Location, ...]:
    outer = ("_PyEval_EvalFrameDefault", "PyEval_EvalCode", "run_mod", "Py_RunMain", "main")
    return (*leaf, *(user(PYTHON, name) for name in outer), user(LIBC, "__libc_start_call_main"))


def host_profile(seed: int = 7) -> list[ProfileSample]:
    """About 10,000 samples over five processes; stable for a given seed."""
    rng = random.Random(seed)
    tower = tuple(unnamed(STRIPPED, 0x100 * i) for i in range(1, 25))  # 24 unnamed frames
    samples = [
        proc(2600, 4242, "python3", *python_stack(user(PYTHON, "list_ass_slice"))),
        proc(900, 4242, "python3", *python_stack(user(LIBC, "__memmove_avx_unaligned_erms"))),
        proc(1500, 4243, "python3", *python_stack(user(PYTHON, "dict_lookup"))),
        proc(1200, 4243, "python3", *tower, *python_stack(user(PYTHON, "ctypes_call"))),
        proc(
            1800,
            777,
            "postgres",
            user(POSTGRES, "ExecScan"),
            user(POSTGRES, "ExecutorRun"),
            user(POSTGRES, "PostgresMain"),
            user(POSTGRES, "main"),
        ),
        proc(
            600,
            777,
            "postgres",
            kernel("copy_user_generic", "ext4_file_read_iter"),
            kernel("vfs_read"),
            kernel("ksys_read"),
            kernel("do_syscall_64"),
            user(LIBC, "__libc_pread64"),
            user(POSTGRES, "FileRead"),
            user(POSTGRES, "PostgresMain"),
            user(POSTGRES, "main"),
        ),
        proc(
            400,
            31,
            "kworker/u8:2",
            kernel("memset_orig"),
            kernel("process_one_work"),
            kernel("worker_thread"),
            kernel("kthread"),
            kernel("ret_from_fork"),
        ),
    ]
    for i in range(300):  # the long tail: 300 functions seen a few times each
        leaf = user(POSTGRES, f"rare_function_{i:03d}", address=0x2000 + i)
        samples.append(
            proc(
                rng.randint(1, 4),
                777,
                "postgres",
                leaf,
                user(POSTGRES, "PostgresMain"),
                user(POSTGRES, "main"),
            )
        )
    return samples


def fragmented_profile(seed: int, stacks: int = 400) -> list[ProfileSample]:
    """Random stacks over a small vocabulary with heavy-tailed counts: frames of every
    width from 0.01 px to most of the graph, shared prefixes, unnamed runs, 6 processes."""
    rng = random.Random(seed)
    functions = [f"fn_{i:02d}" for i in range(40)]
    samples = []
    for _ in range(stacks):
        pid = rng.choice([101, 102, 103, 104, 105, 106])
        comm = "worker" if pid < 104 else f"daemon{pid}"
        locations = []
        for _ in range(rng.randint(1, 14)):
            if rng.random() < 0.2:
                locations.append(unnamed(STRIPPED, rng.randrange(1, 64) * 0x10))
            else:  # few names near the root, many near the leaves: a tree, not a bush
                name = functions[min(int(rng.expovariate(0.3) * (len(locations) + 1)), 39)]
                locations.append(user(PYTHON, name))
        count = min(int(rng.paretovariate(0.5)), 20_000)
        samples.append(proc(count, pid, comm, *reversed(locations)))
    return samples
