"""How a failing rank reports and exits: one clean line on the console, bounded time.

Five kinds of failure reach a rank:

- bad input (`PPInferError`, or a config Hydra cannot compose): found before any process
  group exists, by every rank alike. Rank 0 reports it at once; the other ranks wait
  `REPORT_GRACE_S` first, because under torchrun rank 0's exit makes the agent stop them
  within a fraction of a second, so the message appears once. A rank that is still alive after
  the wait (rank 0 did not fail the same way, e.g. a file missing on one node only) reports it
  itself.
- a lost peer (a gloo/NCCL error after another rank died, or a receive that outlived
  `runtime.timeout_s` because it hung): not this rank's fault. It also waits `REPORT_GRACE_S`,
  so that torchrun names the rank that failed first as the root cause instead of a survivor,
  then says one line and exits.
- a problem with `output.dir` found by the rank that writes it, after the process group
  exists (another run holds the directory, the disk is full): that rank reports it at once.
  When it is found before the run starts, the other ranks learn it from that rank
  (`FoundElsewhere`) and exit with the same code, silently, after `REPORT_GRACE_S` (torchrun
  stops them sooner, when that rank exits). Found mid-run, that rank exits and torchrun stops
  the others.
- Ctrl-C: torchrun passes SIGINT on to every rank (its workers have sessions of their own,
  so this is how a terminal's Ctrl-C reaches them). `interrupt_once` makes it one
  `KeyboardInterrupt` per rank, however often it is pressed; the last rank says
  "interrupted", and every rank exits with `EXIT_INTERRUPTED`. Every whole line of
  results.jsonl stays (see `ppinfer.pipeline.outputs.ResultsWriter`).
- a bug (any other exception): keeps its traceback, on that rank only.

Each kind also writes torchrun's per-worker error file, so the agent's failure summary shows
the message instead of "To enable traceback see ...".
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ppinfer.errors import PPInferError
from ppinfer.pipeline.job import DistEnv
from ppinfer.pipeline.outputs import make_output_dir

log = logging.getLogger("ppinfer")

REPORT_GRACE_S = 5.0
"""Seconds a rank waits before reporting a failure that another rank reports first."""

EXIT_BAD_INPUT = 2
EXIT_PEER_LOST = 3
EXIT_INTERRUPTED = 130
"""Exit codes of a rank; a bug exits with Python's own 1."""

# Lines of Hydra/OmegaConf messages that are advice or internals, not the problem itself.
_NOISE = ("See https://", "To append to your config", "full_key:", "reference_type=", "object_type=")


def tell_agent(message: str, environ: Mapping[str, str] = os.environ) -> None:
    """Give torchrun's agent this rank's root cause, in the error-file JSON that its `record`
    decorator writes, minus the traceback; a no-op outside torchrun."""
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
        Path(path).write_text(json.dumps(data))


def report_bad_input(
    env: DistEnv,
    message: str,
    environ: Mapping[str, str] = os.environ,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Report a user mistake once (rank 0 first, see the module docstring); the exit code."""
    if env.rank != 0:
        sleep(REPORT_GRACE_S)
    log.error("error: %s", message)
    tell_agent(message, environ)
    return EXIT_BAD_INPUT


class FoundElsewhere(PPInferError):
    """A user's problem that another rank found and passed on to this one (which exits with
    the same code, leaving the report to the rank that found it)."""


def report_run_error(
    exc: PPInferError,
    environ: Mapping[str, str] = os.environ,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """A user's problem found after the process group exists: said at once by the rank that
    found it; a rank it was passed on to waits `REPORT_GRACE_S` first, so that the finder
    exits first and is torchrun's root cause, and then only tells the agent. The exit code."""
    if isinstance(exc, FoundElsewhere):
        sleep(REPORT_GRACE_S)
    else:
        log.error("error: %s", exc)
    tell_agent(str(exc), environ)
    return EXIT_BAD_INPUT


def interrupt_once(signum: int, frame: FrameType | None) -> None:
    """SIGINT handler: the first signal raises `KeyboardInterrupt`, later ones are ignored, so
    that a second Ctrl-C cannot cut a rank's clean-up and its one line short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def report_interrupt(env: DistEnv, environ: Mapping[str, str] = os.environ) -> int:
    """Ctrl-C: the last rank says so (one line for the whole job); the exit code."""
    if env.rank == env.world - 1:
        log.error("interrupted")
    tell_agent("interrupted", environ)
    return EXIT_INTERRUPTED


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a rank gets when a peer is gone or stuck: `DistError` (NCCL, the
    store, barriers) and gloo's transport errors, which surface as plain RuntimeErrors
    ("Connection closed by peer", "Timed out waiting ... for recv operation")."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and "gloo" in str(exc)


def gist(exc: BaseException) -> str:
    """The first sentence of an exception's message, without gloo's `[file.cc:line] ` prefix
    and advice ("Connection closed by peer [127.0.0.1]:41149")."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "")
    return text.split(". ")[0].rstrip(".") or type(exc).__name__


def report_peer_failure(
    env: DistEnv,
    exc: BaseException,
    environ: Mapping[str, str] = os.environ,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """One line for a rank that lost a peer (after the grace wait); the exit code."""
    sleep(REPORT_GRACE_S)
    message = f"rank {env.rank} lost contact with another rank ({gist(exc)}): it died or stopped responding"
    log.error("%s", message)
    tell_agent(message, environ)
    return EXIT_PEER_LOST


def describe_bug(exc: BaseException, environ: Mapping[str, str] = os.environ) -> None:
    """Hand torchrun a one-line root cause for an unexpected exception (the traceback itself is
    printed once, by the rank that raised it)."""
    tell_agent(f"{type(exc).__name__}: {gist(exc)}", environ)


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf composition error (and its causes) as one line naming the key.

    Indented lines after a line ending in ':' are a list (e.g. a group's available options)
    and are joined with commas; advice and internals (`_NOISE`) are dropped."""
    text = ""
    cause: BaseException | None = exc
    while cause is not None:
        for raw in str(cause).splitlines():
            line = raw.strip()
            if line.startswith("Config search path"):
                break
            if not line or line.startswith(_NOISE):
                continue
            if raw[:1].isspace() and text.endswith((":", ",")):
                text += f" {line},"
            else:
                text += ("; " if text else "") + line.rstrip(".")
        cause = cause.__cause__
    text = text.rstrip(",") or type(exc).__name__
    override = getattr(exc, "override", None)  # set by a parse error, whose text may omit it
    if isinstance(override, str) and override not in text:
        text = f"{override}: {text}"
    return text


def command_line_problem(config_dir: Path, config_name: str, args: Sequence[str]) -> str | None:
    """Compose the config from command-line `args` the way `@hydra.main` will and create its
    run directory (`output.dir`), which Hydra does first thing, with a traceback when it
    cannot. None when all is well, else the problem in one line. Arguments that are Hydra
    flags (`--help`, `--cfg job`, `-m`) are Hydra's business: then nothing is checked here."""
    if any(arg.startswith("-") for arg in args):
        return None
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(args))
    except (HydraException, OmegaConfBaseException) as exc:
        return f"config: {one_line(exc)}"
    return make_output_dir(Path(cfg.output.dir))
