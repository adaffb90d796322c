"""Runs `launch/infer.py` under torchrun the way a user does, for the reliability tests.

Each job gets its own process session, so the test can see whether any of its processes (the
agent and every worker) outlive it, and can kill the whole session when a job hangs.
`--standalone` makes torchrun pick a free port, so jobs of concurrent test runs never meet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "launch" / "infer.py"


@dataclass(frozen=True)
class JobResult:
    """How a finished job ended."""

    returncode: int
    output: str  # stdout and stderr, interleaved as written
    seconds: float
    leftovers: list[str]  # processes of the job's session still alive after it ended

    def error_lines(self) -> list[str]:
        """ppinfer's own error lines (`[ppinfer rank R] error: ...`)."""
        return [line for line in self.output.splitlines() if "] error: " in line and "[ppinfer rank" in line]

    def project_frames(self) -> list[str]:
        """Traceback frames inside this repository: a rank that died with a traceback."""
        return [
            line for line in self.output.splitlines()
            if line.lstrip().startswith("File \"") and str(REPO) in line and "/.venv/" not in line
        ]


def session_processes(session: int) -> list[psutil.Process]:
    """Live processes of a session (zombies are already dead, only not yet reaped)."""
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(proc.pid) == session and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return alive


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
    try:
        if while_running is not None:
            while_running(proc)
        output, _ = proc.communicate(timeout=max(timeout_s - (time.monotonic() - start), 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[test] job killed after {timeout_s} s\n"
    seconds = time.monotonic() - start
    time.sleep(0.5)  # let the kernel finish tearing down workers the agent just killed
    leftovers = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in session_processes(proc.pid)]
    for p in session_processes(proc.pid):
        p.kill()
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
