"""`launch/infer.py` with a fault injected, for the reliability tests:

    torchrun ... tests/faulty_infer.py RANK CALL raise|hang key=value ...

On rank RANK, the CALL-th stage computation raises `RuntimeError("injected fault")` (a
stand-in for a bug or a device error in the middle of a run) or never returns (a stand-in for
a deadlock); every other rank runs the real code unchanged. The remaining arguments are the
usual overrides.
"""

from __future__ import annotations

import itertools
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ppinfer.pipeline.runtime import StageRunner

ENTRY = Path(__file__).resolve().parent.parent / "launch" / "infer.py"


def inject(call: int, fault: str) -> None:
    """Make the `call`-th `StageRunner.run` of this process raise or hang."""
    real_run = StageRunner.run
    calls = itertools.count(1)

    def run(self: StageRunner, *args: Any, **kwargs: Any) -> torch.Tensor:
        if next(calls) == call:
            if fault == "hang":
                time.sleep(3600)
            raise RuntimeError("injected fault")
        return real_run(self, *args, **kwargs)

    StageRunner.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    fault_rank, fault_call, fault, *overrides = sys.argv[1:]
    if int(os.environ.get("RANK", "0")) == int(fault_rank):
        inject(int(fault_call), fault)
    sys.argv = [str(ENTRY), *overrides]
    runpy.run_path(str(ENTRY), run_name="__main__")
