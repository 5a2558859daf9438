"""Start-up at a raised priority, and every thread back afterwards (needs root for the
raise; unprivileged, start-up keeps the priority it was given)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

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
