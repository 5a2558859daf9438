"""Start-up at a raised priority, and every thread back afterwards (needs root for the
raise; unprivileged, start-up keeps the priority it was given)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.commands.startup_priority import STARTUP_NICE_BOOST, StartupPriority, thread_ids
from tests.conftest import REPO, REQUIRE_BPF, require_tool

CHECK = """
import os, threading
from agent.commands.startup_priority import StartupPriority
priority = StartupPriority()
print(priority.boosted, os.getpriority(os.PRIO_PROCESS, 0))
"""


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_start_up_threads_inherit_the_boost_and_all_go_back() -> None:
    if os.geteuid() != 0:
        if REQUIRE_BPF:  # CI runs as root: there this test must run
            pytest.fail("raising a priority needs root")
        pytest.skip("raising a priority needs root (CAP_SYS_NICE)")
    result: list[int] = []

    def in_a_thread() -> None:  # the whole start-up runs in a fresh thread: its own nice
        original = nice_of(0)
        priority = StartupPriority()
        assert priority.boosted
        assert nice_of(0) == max(-20, original + STARTUP_NICE_BOOST)
        started = threading.Event()
        stop = threading.Event()
        tids: list[int] = []

        def worker() -> None:  # made during start-up, like the unwind workers
            tids.append(threading.get_native_id())
            started.set()
            stop.wait()

        child = threading.Thread(target=worker)
        child.start()
        started.wait()
        assert nice_of(tids[0]) == max(-20, original + STARTUP_NICE_BOOST)
        priority.end()
        result.extend([nice_of(0), nice_of(tids[0]), original])
        stop.set()
        child.join()

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert result[0] == result[2] and result[1] == result[2], result
    assert os.getpid() in thread_ids()


def test_without_cap_sys_nice_start_up_keeps_its_priority() -> None:
    setpriv = require_tool("setpriv")
    result = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    boosted, nice = result.stdout.split()
    assert boosted == "False"
    assert int(nice) == os.getpriority(os.PRIO_PROCESS, 0)


AUTOGROUP_CHECK = """
import os, sys
from pathlib import Path
from agent.commands import startup_priority
Path("/proc/self/autogroup").write_text(sys.argv[1])
startup_priority.begin()
print(Path("/proc/self/autogroup").read_text().split()[-1], flush=True)
if sys.argv[2] == "end":
    startup_priority.end()
    print(Path("/proc/self/autogroup").read_text().split()[-1], flush=True)
"""


def require_autogroups_and_root() -> None:
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("this kernel has no autogroups (CONFIG_SCHED_AUTOGROUP)")
    if os.geteuid() != 0:
        if REQUIRE_BPF:  # CI runs as root: there these tests must run
            pytest.fail("raising a priority needs root")
        pytest.skip("raising a priority needs root (CAP_SYS_NICE)")


def autogroup_run(before: int, end: str) -> list[int]:
    """begin() (then end(), or just exit) in a session of its own, whose autogroup a
    shell that stays in the session reads afterwards."""
    script = f'{sys.executable} -c "$1" {before} {end}; cut -d" " -f3 /proc/self/autogroup'
    result = subprocess.run(
        ["sh", "-c", script, "sh", AUTOGROUP_CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,  # its own session: its own autogroup
    )
    return [int(line) for line in result.stdout.split()]


def test_start_up_raises_the_sessions_autogroup_and_puts_it_back() -> None:
    """With autogroups the scheduler shares CPUs between sessions first: a thread's nice
    alone does not help against busy processes in other sessions."""
    require_autogroups_and_root()
    during, after_end, session_after = autogroup_run(0, "end")
    assert (during, after_end, session_after) == (STARTUP_NICE_BOOST, 0, 0)
    during, session_after = autogroup_run(0, "exit")  # no end(): put back at exit
    assert (during, session_after) == (STARTUP_NICE_BOOST, 0)
    # An absolute target: a session left raised (an agent killed before putting it back)
    # is not raised further, and one set lower by its owner is left so.
    assert autogroup_run(-10, "end") == [-10, -10, -10]
    assert autogroup_run(-15, "end") == [-15, -15, -15]
    assert autogroup_run(5, "end") == [STARTUP_NICE_BOOST, 5, 5]


TWO_AGENTS = """
import sys
from pathlib import Path
from agent.commands.startup_priority import StartupPriority
first = StartupPriority()
second = StartupPriority()  # started while the first was raised: sees -10 as original
ending = [first, second] if sys.argv[1] == "first" else [second, first]
for priority in ending:
    priority.end(quiet=True)
print(Path("/proc/self/autogroup").read_text().split()[-1])
"""


@pytest.mark.parametrize("ends_first", ["first", "second"])
def test_two_agents_of_one_session_leave_it_as_they_found_it(ends_first: str) -> None:
    """Whichever ends first, the session goes back to 0, not to the -10 that the second
    agent took for the original."""
    require_autogroups_and_root()
    result = subprocess.run(
        [sys.executable, "-c", TWO_AGENTS, ends_first],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    assert result.stdout.split() == ["0"], result.stdout
