"""Runs many ppinfer jobs in one process group, so the tests pay for one launch, not one per job.

    python -m torch.distributed.run --nproc_per_node=S tests/pipeline_driver.py RUNS.json

RUNS.json is a list of `{"name": ..., "overrides": ["key=value", ...]}`; every override list
must set `output.dir`. Each rank joins the gloo group once, then for each run composes the
config from `conf/` (exactly as `launch/infer.py` would with the same overrides), prepares the
job, builds its stage and calls `ppinfer.pipeline.rank.execute` with the batch front: the same code path as the
real entry point minus the per-launch process start. `run_all` is importable, so the tests
also use it for the single-process reference (world size 1, no process group).

The launch helpers at the end (`torchrun_command`, `run_command`) start torchrun the way the
tests need: the venv's own `torch.distributed.run`, a new session so that a hung launch can be
killed with all its workers, and a timeout that turns a hang into a test failure.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from ppinfer.config import register_configs
from ppinfer.model import build_stage
from ppinfer.pipeline.batch import BatchFront
from ppinfer.pipeline.job import DistEnv, prepare
from ppinfer.pipeline.rank import execute, setup_logging
from ppinfer.profiling.metrics import current_rss_bytes

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
GROUP_TIMEOUT_S = 60.0
"""gloo timeout: a rank left waiting for a peer fails instead of hanging the test."""


@dataclass(frozen=True)
class Run:
    """One job: a name (for the tests' bookkeeping) and its Hydra overrides."""

    name: str
    overrides: tuple[str, ...]

    @property
    def out_dir(self) -> Path:
        for item in self.overrides:
            if item.startswith("output.dir="):
                return Path(item.removeprefix("output.dir="))
        raise ValueError(f"run {self.name!r} sets no output.dir: {self.overrides}")


def compose_config(overrides: tuple[str, ...]) -> Any:
    """The run configuration `launch/infer.py` would see for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def run_all(runs: list[Run], env: DistEnv) -> None:
    """Execute every run in order on this rank (the process group, if any, is initialised).
    The torch thread count is restored afterwards: the jobs set it from their config."""
    threads = torch.get_num_threads()
    try:
        for run in runs:
            cfg = compose_config(run.overrides)
            job = prepare(cfg, env, cuda_available=False, family_given=False)
            torch.set_num_threads(job.threads)
            stage = build_stage(job.model_path, job.plan, job.dtype, job.device, weights=job.cfg.runtime.weights)
            execute(job, stage, current_rss_bytes(), BatchFront())
    finally:
        torch.set_num_threads(threads)


def write_runs(path: Path, runs: list[Run]) -> Path:
    path.write_text(json.dumps([{"name": r.name, "overrides": list(r.overrides)} for r in runs]))
    return path


def read_runs(path: Path) -> list[Run]:
    return [Run(item["name"], tuple(item["overrides"])) for item in json.loads(path.read_text())]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} RUNS.json")
    register_configs()
    env = DistEnv.from_environ(dict(os.environ))
    setup_logging(env)
    runs = read_runs(Path(argv[1]))
    if env.world > 1:
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        run_all(runs, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def torchrun_command(*args: str) -> list[str]:
    """`python -m torch.distributed.run ARGS` with this interpreter (the venv's torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Finished:
    """What a command left behind: exit code and its combined output."""

    returncode: int
    output: str

    def tail(self, chars: int = 4000) -> str:
        return self.output[-chars:]


def start_command(cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `cmd` in the repository root, in its own session (so its workers can be killed
    together), with stdout and stderr merged, in this environment plus `extra_env`. The
    repository goes last on PYTHONPATH: a fallback when ppinfer is not installed, never in
    front of what the caller chose."""
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def wait_command(proc: subprocess.Popen[str], timeout_s: float) -> Finished:
    """Wait for `proc`; past the timeout, kill its whole process group and report rc -9."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):  # torchrun's workers have sessions of their own
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Finished(-signal.SIGKILL, f"{out}\n[killed after {timeout_s:.0f} s]")
    return Finished(proc.returncode, out)


def run_command(cmd: list[str], timeout_s: float) -> Finished:
    return wait_command(start_command(cmd), timeout_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
