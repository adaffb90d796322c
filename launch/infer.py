"""torchrun entry point: `torchrun --nproc_per_node=N launch/infer.py key=value ...`.

Composes the Hydra config and hands it to `ppinfer.pipeline.launch.run`; all logic lives in
the package so that tests can import it.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import ppinfer.config  # noqa: F401  registers the typed schema in Hydra's ConfigStore
from ppinfer.pipeline.launch import run


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    code = run(cfg, overrides=list(HydraConfig.get().overrides.task))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
