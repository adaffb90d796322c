"""The benchmark points: one `torchrun` of the pipeline, one run of a peer (transformers or
llama.cpp), and the sizes they run at. Plain data, hashable, so a plan holds each run once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Metrics = Mapping[str, Any]
"""One run's metrics.json (or the peer's file of the same shape)."""

PromptSet = Literal["short", "long"]
"""`short`: the built-in prompts; `long`: one prompt of `Sizes.long_prompt_tokens` tokens."""

DEFAULT_MODEL = "default"
"""The model `--model` names (SmolLM2-135M-Instruct unless told otherwise)."""
MODEL_1B = "1.1b-q4_0"
MODEL_7B = "7b-q4_0"
MODEL_MOE = "moe-q4_0"
"""The synthetic models (`ppinfer.bench.synthetic.MODELS`): llama-shaped (1.1B, 7B) and
Qwen3-MoE-shaped, random Q4_0 weights."""


def _model_tag(model: str) -> str:
    return f" [{model}]" if model != DEFAULT_MODEL else ""


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """The workload knobs: the full benchmark's defaults, shrunk by `--quick`."""

    lane_size: int = 16
    """Sequences per lane in the throughput points (2 lanes of it make the batch of 32)."""
    max_new_tokens: int = 64
    """Tokens generated per sequence (EOS ignored) in the throughput and latency points."""
    long_prompt_tokens: int = 512
    """Length of the prefill scenario's single prompt."""
    prefill_chunk: int = 64
    """Prompt tokens per prefill step in the prefill scenario (several chunks pipeline)."""
    prefill_new_tokens: int = 4
    """Tokens generated after the long prompt (only prefill is measured there)."""
    memory_new_tokens: int = 8
    """Tokens generated in the memory points (weights dominate; the KV cache is small)."""
    peer_threads: int = 2
    """Threads of the peers, transformers and llama.cpp (the same two cores the pipeline uses)."""
    quant_lane_size: int = 8
    """Sequences per lane in the 1.1B and MoE batch points (2 lanes of it against llama.cpp's batch)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"{name}={value}: must be at least 1")


FULL = Sizes()
QUICK = Sizes(
    lane_size=2, max_new_tokens=4, long_prompt_tokens=96, prefill_chunk=32,
    prefill_new_tokens=2, memory_new_tokens=2, quant_lane_size=2,
)


@dataclass(frozen=True, kw_only=True)
class PipelineRun:
    """One `torchrun launch/infer.py` point: `lanes` lanes of `lane_size` sequences each."""

    stages: int
    threads: int
    lanes: int
    lane_size: int
    max_new_tokens: int
    prompts: PromptSet = "short"
    prefill_chunk: int | None = None
    """None leaves the runtime's default."""
    layers: str | None = None
    """`pipeline.layers` policy; None leaves the runtime's default (balanced)."""
    weights: str | None = None
    """`runtime.weights` (`quantized` or `dequantized`); None leaves the runtime's default."""
    model: str = DEFAULT_MODEL
    """`default` (the `--model` file) or a synthetic model's name."""

    @property
    def sequences(self) -> int:
        return self.lanes * self.lane_size

    @property
    def label(self) -> str:
        chunk = f" chunk {self.prefill_chunk}" if self.prefill_chunk is not None else ""
        layers = f" {self.layers}" if self.layers is not None else ""
        weights = f" {self.weights}" if self.weights is not None else ""
        return (f"ppinfer S={self.stages} T={self.threads} {self.lanes}x{self.lane_size} {self.prompts}"
                f"{chunk}{layers}{weights}{_model_tag(self.model)}")

    @property
    def slug(self) -> str:
        """A directory name unique to these settings."""
        chunk = f"-c{self.prefill_chunk}" if self.prefill_chunk is not None else ""
        layers = f"-{self.layers}" if self.layers is not None else ""
        weights = f"-{self.weights}" if self.weights is not None else ""
        model = f"-{self.model}" if self.model != DEFAULT_MODEL else ""
        return (f"pp-s{self.stages}-t{self.threads}-m{self.lanes}x{self.lane_size}"
                f"-{self.prompts}-n{self.max_new_tokens}{chunk}{layers}{weights}{model}")


@dataclass(frozen=True, kw_only=True)
class PeerRun:
    """transformers `generate` on one left-padded batch of `sequences` prompts."""

    threads: int
    sequences: int
    max_new_tokens: int
    prompts: PromptSet = "short"

    @property
    def label(self) -> str:
        return f"transformers T={self.threads} 1x{self.sequences} {self.prompts}"

    @property
    def model(self) -> str:
        """The transformers peer runs the default model only."""
        return DEFAULT_MODEL

    @property
    def slug(self) -> str:
        return f"hf-t{self.threads}-b{self.sequences}-{self.prompts}-n{self.max_new_tokens}"


@dataclass(frozen=True, kw_only=True)
class LlamaCppRun:
    """llama.cpp on `sequences` sequences decoded together (its batched decoding), `threads` threads."""

    threads: int
    sequences: int
    max_new_tokens: int
    prompts: PromptSet = "short"
    model: str = DEFAULT_MODEL

    @property
    def label(self) -> str:
        return f"llama.cpp T={self.threads} 1x{self.sequences} {self.prompts}{_model_tag(self.model)}"

    @property
    def slug(self) -> str:
        return f"lc-t{self.threads}-b{self.sequences}-{self.prompts}-n{self.max_new_tokens}-{self.model}"


Run = PipelineRun | PeerRun | LlamaCppRun
