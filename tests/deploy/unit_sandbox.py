"""Run a command inside the sandbox systemd/strobe.service describes, without systemd.

The test machine's PID 1 is not systemd, so `systemctl start` is not available. This
script applies the unit's settings the way systemd 252 implements them, from the unit
file itself, then execs the command (same pid throughout, so signals reach it):

  outer stage (root):  a private mount namespace; ProtectSystem=strict (every mount but
                       /dev, /proc, /sys remounted read-only); PrivateTmp=yes (a fresh
                       tmpfs on /tmp; the work dir is bound back in at /tmp/work, and
                       a checkout under /tmp at its own path, read-only);
                       then `setpriv` to an unprivileged user (DynamicUser=yes) keeping
                       only AmbientCapabilities/CapabilityBoundingSet, no_new_privs.
  inner stage:         the seccomp filter of SystemCallFilter= (an allow list expanded
                       with `systemd-analyze syscall-filter`), SystemCallErrorNumber=,
                       RestrictAddressFamilies= and MemoryDenyWriteExecute=.

usage: unit_sandbox.py UNIT WORKDIR -- COMMAND...   (as root)
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
CLONE_NEWNS = 0x00020000
SANDBOX_USER, SANDBOX_GROUP = "nobody", "nogroup"  # stand-ins for DynamicUser=
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7
CHECKOUT = Path(__file__).resolve().parents[2]  # the agent's code and its .venv
ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def service_directives(unit: Path) -> dict[str, list[str]]:
    """Key -> values of the [Service] section (repeated keys accumulate)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def single(directives: dict[str, list[str]], key: str, default: str = "") -> str:
    return directives.get(key, [default])[-1]


def expand_syscalls(names: list[str]) -> set[str]:
    """System call names of an allow list, groups (@name) expanded as systemd does."""
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        listing = subprocess.run(
            ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
        ).stdout
        members = [line.strip() for line in listing.splitlines()[1:]]
        out |= expand_syscalls([m for m in members if m and not m.startswith("#")])
    return out


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class Seccomp:
    """The few libseccomp calls needed, through ctypes (libseccomp2 comes with systemd)."""

    def __init__(self, default_action: int) -> None:
        self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.ctx = self.lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, syscall: str, *conditions: tuple[int, int, int, int]) -> None:
        number = self.lib.seccomp_syscall_resolve_name(syscall.encode())
        if number < 0:
            return  # not a system call of this architecture (e.g. _llseek on x86_64)
        args = (_ArgCmp * max(len(conditions), 1))(*(_ArgCmp(*c) for c in conditions))
        result = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(conditions), args)
        if result != 0:
            raise OSError(-result, f"seccomp rule for {syscall}: {os.strerror(-result)}")

    def load(self) -> None:
        result = self.lib.seccomp_load(self.ctx)
        if result != 0:
            raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")


def errno_action(name: str) -> int:
    return 0x00050000 | (getattr(errno, name) & 0xFFFF)


def install_seccomp(directives: dict[str, list[str]]) -> None:
    filters = " ".join(directives.get("SystemCallFilter", [])).split()
    if not filters or any(f.startswith("~") for f in filters):
        raise SystemExit("unit_sandbox: only an allow-list SystemCallFilter= is supported")
    seccomp = Seccomp(errno_action(single(directives, "SystemCallErrorNumber", "EPERM")))
    allowed = expand_syscalls(filters)
    families = single(directives, "RestrictAddressFamilies").split()
    if families:
        allowed.discard("socket")
        for family in families:
            seccomp.rule(SCMP_ACT_ALLOW, "socket", (0, SCMP_CMP_EQ, ADDRESS_FAMILIES[family], 0))
    mdwe = single(directives, "MemoryDenyWriteExecute") == "yes"
    guarded = {
        "mmap": PROT_WRITE | PROT_EXEC,
        "mprotect": PROT_EXEC,
        "pkey_mprotect": PROT_EXEC,
        "shmat": SHM_EXEC,
    }
    for syscall in sorted(allowed):
        if mdwe and syscall in guarded:
            # Allowed unless the masked flags are all set (systemd denies exactly those).
            mask = guarded[syscall]
            seccomp.rule(SCMP_ACT_ALLOW, syscall, (2, SCMP_CMP_MASKED_EQ, mask, 0))
            if mask == PROT_WRITE | PROT_EXEC:
                for flags in (PROT_WRITE, PROT_EXEC):
                    seccomp.rule(SCMP_ACT_ALLOW, syscall, (2, SCMP_CMP_MASKED_EQ, mask, flags))
        else:
            seccomp.rule(SCMP_ACT_ALLOW, syscall)
    seccomp.load()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def enc(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data or None)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} on {target}: {os.strerror(code)}")


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        points.append(target)
    return points


def enter_mount_sandbox(directives: dict[str, list[str]], workdir: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    work_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    checkout_fd = os.open(CHECKOUT, os.O_PATH | os.O_DIRECTORY)
    if single(directives, "ProtectSystem") == "strict":
        for point in mount_points():
            if not re.match(r"^/(dev|proc|sys)(/|$)", point):
                try:
                    _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.EACCES):
                        raise
    if single(directives, "PrivateTmp") == "yes":
        _mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
        os.mkdir("/tmp/work")
        _mount(f"/proc/self/fd/{work_fd}", "/tmp/work", None, MS_BIND)
        # A bind mount copies the (now read-only) flags of its source: make it writable,
        # as systemd does for StateDirectory= and CacheDirectory=.
        _mount(None, "/tmp/work", None, MS_REMOUNT | MS_BIND)
        if CHECKOUT.is_relative_to("/tmp"):
            # A checkout under /tmp (a CI clone) stands for the installed package: keep
            # it visible, read-only, where it was (systemd's BindReadOnlyPaths=).
            CHECKOUT.mkdir(parents=True)
            _mount(f"/proc/self/fd/{checkout_fd}", str(CHECKOUT), None, MS_BIND)
            _mount(None, str(CHECKOUT), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    os.close(work_fd)
    os.close(checkout_fd)


def setpriv_command(directives: dict[str, list[str]]) -> list[str]:
    caps = single(directives, "AmbientCapabilities").split()
    bounding = single(directives, "CapabilityBoundingSet").split()
    assert set(caps) <= set(bounding), "ambient capabilities must be in the bounding set"

    def as_list(names: list[str]) -> str:
        return ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in names)])

    command = ["setpriv"]
    if single(directives, "DynamicUser") == "yes":
        command += [f"--reuid={SANDBOX_USER}", f"--regid={SANDBOX_GROUP}", "--clear-groups"]
    command += [
        f"--inh-caps={as_list(caps)}",
        f"--ambient-caps={as_list(caps)}",
        f"--bounding-set={as_list(bounding)}",
    ]
    if single(directives, "NoNewPrivileges") == "yes":
        command.append("--no-new-privs")
    return command


def main(args: list[str]) -> None:
    if args[:1] == ["inner"] and len(args) >= 4 and args[2] == "--":  # inner UNIT -- COMMAND
        install_seccomp(service_directives(Path(args[1])))
        os.execvp(args[3], args[3:])
    if len(args) < 4 or args[2] != "--":
        raise SystemExit(__doc__)
    unit, workdir, command = Path(args[0]).resolve(), Path(args[1]), args[3:]
    directives = service_directives(unit)
    enter_mount_sandbox(directives, workdir)
    inner = [sys.executable, str(Path(__file__).resolve()), "inner", str(unit), "--", *command]
    os.execvp("setpriv", [*setpriv_command(directives), *inner])


if __name__ == "__main__":
    main(sys.argv[1:])
