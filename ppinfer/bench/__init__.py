"""The benchmark harness: `python -m ppinfer.bench` (see `__main__` for usage).

- `prompts`: the fixed inputs (32 short English prompts, a long prompt of an exact length).
- `runs`: the benchmark points (a pipeline run, a transformers or llama.cpp run) and sizes.
- `metrics`: the numbers read from a run's metrics, and the ratios of two of them.
- `scenarios`: named groups of target ratios, in suites.
- `planner`: derives exactly the runs each chosen scenario's ratios need, each once.
- `sweep`: runs the points one after another, each in its own process (torchrun for ppinfer,
  `ppinfer.bench.peer` for transformers, `ppinfer/bench/llamacpp.py` for llama.cpp), and reads
  their metrics back.
- `peer`: the transformers `generate` peer on the same GGUF file.
- `llamacpp`: the llama.cpp peer (llama-cpp-python's low-level API, the optional `bench` extra).
- `synthetic`: the llama-shaped random-Q4_0 benchmark models (1.1B and 7B shapes), built once.
- `report`: the ratios' values, the run table, machine info, and the Markdown page.
"""

from ppinfer.bench.metrics import Ratio
from ppinfer.bench.planner import Plan, plan
from ppinfer.bench.runs import FULL, QUICK, LlamaCppRun, PeerRun, PipelineRun, Sizes
from ppinfer.bench.scenarios import SCENARIOS, SUITES

__all__ = ["FULL", "QUICK", "SCENARIOS", "SUITES", "LlamaCppRun", "PeerRun", "PipelineRun", "Plan", "Ratio",
           "Sizes", "plan"]
