"""The test suite's process runner: a command that hangs is killed with every process it started, also those in a
session of their own (as torchrun starts its workers), and nothing it started outlives it when it ends."""

from __future__ import annotations

import sys
import textwrap
import time

import psutil
import pytest

from ._processes import ProcessTimeout, run

# Starts a child in its own process group and one in a session of its own, prints their pids, then waits or exits.
_TREE = textwrap.dedent("""
    import subprocess, sys, time
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    group = subprocess.Popen(sleep)
    session = subprocess.Popen(sleep, start_new_session=True)
    print(group.pid, session.pid, flush=True)
    if sys.argv[1] == "hang":
        time.sleep(600)
""")


def _gone(pid: int) -> bool:
    """Ended within 10 s (a zombie that no one has reaped yet has ended)."""
    try:
        process = psutil.Process(pid)
        for _ in range(100):
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
            time.sleep(0.1)
        return False
    except psutil.NoSuchProcess:
        return True


def test_a_hanging_command_is_killed_with_everything_it_started():
    with pytest.raises(ProcessTimeout) as error:
        run([sys.executable, "-c", _TREE, "hang"], timeout=10)
    pids = [int(p) for p in error.value.output.split()]
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)
    assert "killed with every process it started" in str(error.value)


def test_processes_left_behind_by_a_finished_command_are_killed():
    result = run([sys.executable, "-c", _TREE, "exit"], timeout=60)
    assert result.returncode == 0
    group, session = (int(p) for p in result.stdout.split())
    assert _gone(group)  # left in the command's process group
    psutil.Process(session).kill()  # in a session of its own and orphaned: no longer the command's (torchrun waits for its workers)
