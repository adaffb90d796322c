"""torchrun entry point: `torchrun --nproc_per_node=N launch/infer.py key=value ...`.

Composes the Hydra config and hands it to `ppinfer.pipeline.batch.run`; all logic lives in
the package so that tests can import it. The command line is checked once before
`@hydra.main` composes it: Hydra would print a bad override's multi-line message (or the
traceback of a run directory it cannot create) on every rank, while `report_bad_input` prints
it once, on one line. Ctrl-C ends each rank with one line at most, no traceback (see
`ppinfer.pipeline.failures`).
"""

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ppinfer.config import register_configs
from ppinfer.pipeline.batch import run
from ppinfer.pipeline.failures import command_line_problem, interrupt_once, report_bad_input, report_interrupt
from ppinfer.pipeline.job import DistEnv
from ppinfer.pipeline.rank import setup_logging

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    code = run(cfg, overrides=list(HydraConfig.get().overrides.task))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_configs()
    signal.signal(signal.SIGINT, interrupt_once)
    env = DistEnv.from_environ(dict(os.environ))
    setup_logging(env)
    try:
        problem = command_line_problem(CONFIG_DIR, "config", sys.argv[1:])
        if problem is not None:
            sys.exit(report_bad_input(env, problem))
        main()
    except KeyboardInterrupt:
        sys.exit(report_interrupt(env))
