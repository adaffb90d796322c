"""`launch/serve.py` as a benchmark starts it: a context that runs the server on its own ranks,
waits until `/health` says ok, yields its URL and model id, and stops every rank after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from ppinfer.bench.sweep import repo_root

START_TIMEOUT_S = 300.0


def torchrun(script: str, overrides: Sequence[str], nproc: int = 2) -> list[str]:
    """The command that runs `launch/<script>` on `nproc` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            str(repo_root() / "launch" / script), *overrides]


@contextmanager
def running_server(
    overrides: Sequence[str], port: int, nproc: int = 2, log: Path | None = None
) -> Iterator[tuple[str, str]]:
    """(url, model id) of a server started with `overrides` on `port`; its output goes to
    `log` (discarded when None)."""
    url = f"http://127.0.0.1:{port}"
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen(torchrun("serve.py", [f"server.port={port}", *overrides], nproc), stdout=out,
                              stderr=subprocess.STDOUT, cwd=repo_root(), env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not come up" + (f"; see {log}" if log else ""))
            time.sleep(0.5)
        yield url, httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        if log is not None:
            out.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
