"""torchrun entry point of the server: `torchrun --nproc_per_node=N launch/serve.py key=value ...`.

The same Hydra config as `launch/infer.py`, plus the `server.*` keys; all logic lives in
`ppinfer.serving.launch` so that tests can import it. The command line is checked once before
`@hydra.main` composes it, as `launch/infer.py` does.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ppinfer.config import register_configs
from ppinfer.pipeline.failures import command_line_problem, report_bad_input
from ppinfer.pipeline.job import DistEnv
from ppinfer.pipeline.rank import setup_logging
from ppinfer.serving.launch import serve

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    code = serve(cfg, overrides=list(HydraConfig.get().overrides.task))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_configs()
    env = DistEnv.from_environ(dict(os.environ))
    setup_logging(env)
    problem = command_line_problem(CONFIG_DIR, "config", sys.argv[1:])
    if problem is not None:
        sys.exit(report_bad_input(env, problem))
    main()
