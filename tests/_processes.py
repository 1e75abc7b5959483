"""Subprocesses that cannot outlive their test or hang it: each runs in a session of its own under a timeout,
and when it ends, fails or times out, every process it started is killed: the DDP ranks of Lightning's launcher
and their DataLoader workers and forkservers (its process group), and torchrun's workers (each in a session of
their own, so found as descendants). A timeout is an error that carries the output so far and, where py-spy is
installed, the Python stack of every process that was still running.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[1]

__all__ = ["ProcessTimeout", "after_lines", "cli_env", "kill_tree", "lines_in", "run", "run_cli", "run_together",
           "run_until"]


class ProcessTimeout(subprocess.TimeoutExpired):
    """The command ran past its timeout; it and all it started have been killed."""

    def __init__(self, cmd, timeout: float, output: str, stderr: str, stacks: str):
        super().__init__(cmd, timeout, output, stderr)
        self.stacks = stacks

    def __str__(self) -> str:
        return (f"{super().__str__()} (killed with every process it started)\n--- stderr (end) ---\n"
                f"{(self.stderr or '')[-3000:]}\n--- stacks when it was killed ---\n{self.stacks}")


def _family(pid: int, alive: bool) -> list[psutil.Process]:
    """The members of process group ``pid`` (a session leader's) and, while that leader is ``alive`` (not yet
    reaped: its pid cannot belong to another process), its descendants, parents first."""
    family: dict[int, psutil.Process] = {}
    if alive:
        try:
            root = psutil.Process(pid)
            family[pid] = root
            family.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in psutil.process_iter():  # members whose parent died and left them to init, and what they started
        try:
            if os.getpgid(p.pid) == pid:
                family.setdefault(p.pid, p)
                family.update((c.pid, c) for c in p.children(recursive=True) if c.pid not in family)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(family.values())


def _signal(processes: list[psutil.Process], sig: int) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (started with ``start_new_session``) and every process it started. They are stopped first,
    until no new one appears, so that none forks a child between being found and being killed."""
    seen: set[int] = set()
    while True:
        family = [p for p in _family(proc.pid, proc.returncode is None) if p.pid != os.getpid()]
        new = [p for p in family if p.pid not in seen]
        if not new:
            break
        _signal(new, signal.SIGSTOP)
        seen.update(p.pid for p in new)
    _signal(family, signal.SIGKILL)


def _stacks(proc: subprocess.Popen, budget: float = 20.0) -> str:
    """py-spy's dump of each process still running, within ``budget`` seconds in all."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return "(install py-spy to see where each process was)"
    dumps, deadline = [], time.monotonic() + budget
    for p in _family(proc.pid, alive=True):
        left = deadline - time.monotonic()
        if left <= 0:
            dumps.append("(no time left for the other processes)")
            break
        try:
            dump = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(p.pid)], capture_output=True,
                                  text=True, timeout=left)
            dumps.append(dump.stdout.strip() or dump.stderr.strip())
        except (subprocess.TimeoutExpired, OSError) as err:
            dumps.append(f"pid {p.pid}: py-spy failed: {err}")
    return "\n\n".join(dumps)


def run(command: list[str], *, timeout: float, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` in a session of its own; raises
    ``ProcessTimeout`` after ``timeout`` seconds. Whatever way it ends, nothing it started is left running.

    The output goes to files, not pipes: a process left behind would hold a pipe open, and reading it to its end
    would wait for that process."""
    return run_until(command, None, timeout=timeout, cwd=cwd, env=env)


def _read(file) -> str:
    file.seek(0)
    return file.read()


def run_until(command: list[str], interrupt: Callable[[], bool] | None, *, timeout: float, sig: int = signal.SIGKILL,
              cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """``run``, but once ``interrupt()`` is true (polled every 0.05 s) the command gets ``sig``: SIGKILL goes to it
    and everything it started (a killed job, ``returncode`` -9), another signal to the command alone (which then
    ends by itself)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=cwd, env=env, start_new_session=True)
        deadline, sent = time.monotonic() + timeout, interrupt is None
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    stacks = _stacks(proc)
                    kill_tree(proc)
                    proc.wait()
                    raise ProcessTimeout(command, timeout, _read(out), _read(err), stacks)
                if not sent and interrupt():
                    sent = True
                    if sig == signal.SIGKILL:
                        kill_tree(proc)
                        proc.wait()
                        break
                    proc.send_signal(sig)
                time.sleep(0.05)
        finally:
            # Workers or ranks that outlived the main process, or a test that was interrupted. pytest-timeout's alarm
            # waits until they are killed: between SIGSTOP and SIGKILL it would leave them stopped.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            try:
                kill_tree(proc)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            if proc.poll() is None:
                proc.wait()
        return subprocess.CompletedProcess(command, proc.returncode, _read(out), _read(err))


def lines_in(path: Path) -> int:
    """The lines of a file a run appends to (0 before it exists): e.g. the steps ``RecordKeys`` logged."""
    return len(Path(path).read_text().splitlines()) if Path(path).exists() else 0


def after_lines(path: Path, lines: int, delay: float = 0.0) -> Callable[[], bool]:
    """An ``interrupt`` for ``run_until``: true from ``delay`` seconds after ``path`` gained ``lines`` lines since
    this call (a run started next trained that many steps of its own)."""
    start, reached = lines_in(path), []

    def due() -> bool:
        if not reached and lines_in(path) >= start + lines:
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() - reached[0] >= delay
    return due


def run_together(commands: list[list[str]], *, timeout: float, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Several commands at once (the nodes of a job), each as ``run``, under its own timeout."""
    results: dict[int, subprocess.CompletedProcess | BaseException] = {}

    def one(i: int, command: list[str]) -> None:
        try:
            results[i] = run(command, timeout=timeout, env=env)
        except BaseException as err:  # noqa: BLE001 (raised below, in the test's thread)
            results[i] = err

    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(commands)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return [results[i] for i in range(len(commands))]


def cli_env(ddp: bool = False) -> dict:
    """The environment of a ``python -m mmlit.cli`` started by a test (``tests._ddp_helpers`` importable; gloo)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # A W&B run made in the test process leaves its service's address here; a command of its own starts its own, as
    # it would outside the tests (two runs with one id in one service are refused: "run ID is in use").
    env.pop("WANDB_SERVICE", None)
    if ddp:
        env["PL_TORCH_DISTRIBUTED_BACKEND"] = "gloo"
    return env


def run_cli(*args: str, timeout: float, ddp: bool = False) -> subprocess.CompletedProcess:
    """``python -m mmlit.cli ARGS`` from the repository (``tests._ddp_helpers`` importable; gloo for DDP)."""
    env = cli_env(ddp)
    return run([sys.executable, "-m", "mmlit.cli", *args], timeout=timeout, env=env)


def free_port() -> int:
    """A TCP port free on loopback now (for a test's rendezvous: torchrun's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
