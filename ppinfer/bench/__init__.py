"""The benchmark harness: `python -m ppinfer.bench` (see `__main__` for usage).

- `prompts`: the fixed inputs (32 short English prompts, a long prompt of an exact length).
- `scenarios`: the benchmark points, the ratios the pipeline targets, and the planner that
  derives exactly the runs each chosen scenario's ratios need.
- `sweep`: runs the points one after another, each in its own process (torchrun for ppinfer,
  `ppinfer.bench.peer` for transformers, `ppinfer/bench/llamacpp.py` for llama.cpp), and reads
  their metrics back.
- `peer`: the transformers `generate` peer on the same GGUF file.
- `llamacpp`: the llama.cpp peer (llama-cpp-python's low-level API, the optional `bench` extra).
- `synthetic`: the llama-shaped random-Q4_0 benchmark models (1.1B and 7B shapes), built once.
- `report`: the ratios' values, the run table, machine info, and the Markdown page.
"""

from ppinfer.bench.scenarios import (
    FULL,
    QUICK,
    SCENARIOS,
    SUITES,
    LlamaCppRun,
    PeerRun,
    PipelineRun,
    Plan,
    Ratio,
    Sizes,
    plan,
)

__all__ = ["FULL", "QUICK", "SCENARIOS", "SUITES", "LlamaCppRun", "PeerRun", "PipelineRun", "Plan", "Ratio",
           "Sizes", "plan"]
