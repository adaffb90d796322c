"""Runs `launch/infer.py` under torchrun the way a user does, for the reliability tests.

torchrun starts each worker in a session of its own, so neither the agent's session nor its
process group holds the workers, and a worker whose agent is gone is nobody's child. A
`ProcessTree` therefore records the agent's descendants while it runs: the test can see
whether any of them (the agent and every worker) outlive the job, and kill them all when a job
hangs. `--standalone` makes torchrun pick a free port, so jobs of concurrent test runs never
meet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "infer.py"


@dataclass(frozen=True)
class JobResult:
    """How a finished job ended."""

    returncode: int
    output: str  # stdout and stderr, interleaved as written
    seconds: float
    leftovers: list[str]  # processes of the job (agent, workers) still alive after it ended

    def error_lines(self) -> list[str]:
        """ppinfer's own error lines (`[ppinfer rank R] error: ...`)."""
        return [line for line in self.output.splitlines() if "] error: " in line and "[ppinfer rank" in line]

    def project_frames(self) -> list[str]:
        """Traceback frames inside this repository: a rank that died with a traceback."""
        return [
            line for line in self.output.splitlines()
            if line.lstrip().startswith("File \"") and str(REPO) in line and "/.venv/" not in line
        ]


class ProcessTree:
    """Every process started under `root` (the torchrun agent), recorded every 50 ms while the
    root lives, so that its workers can be found after it is gone."""

    def __init__(self, root: int) -> None:
        self._root = psutil.Process(root)
        self._seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                for child in self._root.children(recursive=True):
                    self._seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.05)

    def alive(self) -> list[psutil.Process]:
        """The recorded processes still running (psutil checks a pid still names the same
        process), the root included; zombies are dead, only not yet reaped."""
        alive = []
        for proc in [self._root, *self._seen.values()]:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        return alive

    def kill(self) -> None:
        """SIGKILL the root and every recorded process still running."""
        self._stop.set()
        for proc in self.alive():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue


def describe(procs: list[psutil.Process]) -> list[str]:
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])}")
        except psutil.NoSuchProcess:
            continue
    return described


def command(world: int, args: list[str], script: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        str(script), *args,
    ]


def run_job(
    world: int,
    args: list[str],
    timeout_s: float,
    while_running: Callable[[subprocess.Popen[str]], None] | None = None,
    script: Path = ENTRY,
) -> JobResult:
    """Run one job of `script` (`launch/infer.py` with `args` as overrides by default) to its
    end, killing its session after `timeout_s` (the caller's assertions on `seconds` then
    report it). `while_running` is called once, right after the start."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.monotonic()
    proc = subprocess.Popen(
        command(world, args, script), cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    tree = ProcessTree(proc.pid)
    try:
        if while_running is not None:
            while_running(proc)
        output, _ = proc.communicate(timeout=max(timeout_s - (time.monotonic() - start), 1.0))
    except subprocess.TimeoutExpired:
        tree.kill()
        output, _ = proc.communicate()
        output += f"\n[test] job killed after {timeout_s} s\n"
    seconds = time.monotonic() - start
    time.sleep(0.5)  # let the kernel finish tearing down workers the agent just killed
    leftovers = describe(tree.alive())
    tree.kill()
    return JobResult(proc.returncode, output, seconds, leftovers)


def worker_pids(agent: psutil.Process) -> dict[int, int]:
    """rank -> pid of the agent's worker processes (read from their environment)."""
    ranks = {}
    for child in agent.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "infer.py" in " ".join(child.cmdline()):
            ranks[int(rank)] = child.pid
    return ranks
