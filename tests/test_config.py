"""Hydra composition of `conf/`, the typed schema, and `validate_config` / `resolve_*`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from ppinfer.config import (
    Config,
    LaneLayout,
    resolve_device,
    resolve_dtype,
    resolve_lanes,
    resolve_threads,
    validate_config,
)
from ppinfer.errors import ConfigError
from ppinfer.sampling.params import GenerationParams

CONF_DIR = str((Path(__file__).resolve().parent.parent / "conf").resolve())

# The contract command line of DESIGN.md, as Hydra overrides (shell quoting removed).
CONTRACT_OVERRIDES = [
    "model.path=F",
    "pipeline.layers=[8,8,7,7]",
    "pipeline.microbatches=4",
    "task=score",
    'prompts=["a","b"]',
    "chat=true",
    "input.token_ids=[1,2,3]",
    "generation.max_new_tokens=64",
    "generation.temperature=0.0",
    "generation.top_k=5",
    "generation.top_p=0.9",
    "generation.seed=1",
    "generation.ignore_eos=true",
    "runtime.device=cpu",
    "runtime.dtype=bfloat16",
    "runtime.threads=2",
    "runtime.weights=dequantized",
    "output.dir=D",
    "profile=tensorboard",
]


@pytest.fixture(scope="module")
def hydra_ctx() -> Iterator[None]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        yield


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    return compose("config", overrides=overrides, return_hydra_config=hydra)


def test_contract_command_line_composes(hydra_ctx: None) -> None:
    cfg = _compose(CONTRACT_OVERRIDES)
    assert OmegaConf.get_type(cfg) is Config
    assert cfg.model.path == "F"
    assert list(cfg.pipeline.layers) == [8, 8, 7, 7]
    assert cfg.pipeline.microbatches == 4
    assert cfg.task == "score"
    assert list(cfg.prompts) == ["a", "b"]
    assert cfg.chat is True
    assert list(cfg.input.token_ids) == [1, 2, 3]
    g = cfg.generation
    assert (g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.seed, g.ignore_eos) == (
        64, 0.0, 5, 0.9, 1, True
    )
    assert (cfg.runtime.device, cfg.runtime.dtype, cfg.runtime.threads) == ("cpu", "bfloat16", 2)
    assert cfg.output.dir == "D"
    assert cfg.profile.enabled is True
    # The line sets generate-only and score-only keys to show that every key exists; a run
    # gives one task's keys (the other task's are rejected, see BAD_VALUES).
    validate_config(_compose([*CONTRACT_OVERRIDES, "prompts=null"]), world_size=4, cuda_available=False)
    generate = _compose([*CONTRACT_OVERRIDES, "task=generate", "input.token_ids=null"])
    validate_config(generate, world_size=4, cuda_available=False)


def test_defaults_and_hydra_settings(hydra_ctx: None) -> None:
    cfg = _compose([], hydra=True)
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.family == "llama"
    assert cfg.model.path is None
    assert cfg.pipeline.layers == "balanced" and cfg.pipeline.stages is None
    assert cfg.pipeline.prefill_chunk == 128 and cfg.pipeline.refill_chunk == 16
    assert cfg.task == "generate" and cfg.chat is False
    assert cfg.generation.temperature == 0.0 and list(cfg.generation.stop) == []
    assert cfg.runtime.device == "auto" and cfg.runtime.dtype is None
    assert cfg.profile.enabled is False
    # One pinned run dir, no .hydra snapshot, no chdir, and Hydra leaves logging alone.
    assert cfg.hydra.run.dir == cfg.output.dir == "outputs/latest"
    assert cfg.hydra.output_subdir is None
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.job_logging.root is None
    assert cfg.hydra.hydra_logging.root is None
    assert _compose(["output.dir=/tmp/x"], hydra=True).hydra.run.dir == "/tmp/x"


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["pipeline=uniform"], "pipeline.layers", "uniform"),
        (["pipeline=balanced"], "pipeline.layers", "balanced"),
        (["pipeline.layers=uniform"], "pipeline.layers", "uniform"),
        (["runtime=cpu"], "runtime.device", "cpu"),
        (["runtime=cpu"], "runtime.dtype", "float32"),
        (["runtime=cuda"], "runtime.device", "cuda"),
        (["runtime=cuda"], "runtime.dtype", "bfloat16"),
        (["runtime=auto"], "runtime.dtype", None),
        (["model=gemma3_270m"], "model.name", "gemma-3-270m"),
        (["model=gemma3_270m"], "model.family", "gemma3"),
        (["model=smollm2"], "model.family", "llama"),
        (["profile=tensorboard"], "profile.enabled", True),
        (["profile=off"], "profile.enabled", False),
        (["profile=tensorboard", "profile.active=2"], "profile.active", 2),
    ],
)
def test_presets(hydra_ctx: None, overrides: list[str], key: str, expected: object) -> None:
    assert OmegaConf.select(_compose(overrides), key) == expected


@pytest.mark.parametrize(
    "override",
    [
        "generation.temprature=0.5",
        "pipeline.microbatch=2",
        "runtime.dtyp=float32",
        "promts=[\"a\"]",
        "generation.top_k=abc",
        "pipeline.microbatches=two",
        "profile=tensorbord",
    ],
)
def test_misspelt_or_mistyped_key_fails_at_compose(hydra_ctx: None, override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        _compose([override])


# (overrides, world size, cuda available, the key and the value the message must name)
BAD_VALUES = [
    (["task=train"], 1, False, "task", "train"),
    (["pipeline.microbatches=0"], 1, False, "pipeline.microbatches", "0"),
    (["pipeline.lane_size=-1"], 1, False, "pipeline.lane_size", "-1"),
    (["pipeline.prefill_chunk=0"], 1, False, "pipeline.prefill_chunk", "0"),
    (["pipeline.refill_chunk=0"], 1, False, "pipeline.refill_chunk", "0"),
    (["pipeline.stages=3"], 2, False, "pipeline.stages", "3"),
    (["pipeline.layers=balance"], 1, False, "pipeline.layers", "balance"),
    (["pipeline.layers=[4,x]"], 1, False, "pipeline.layers", "x"),
    (["pipeline.layers=[]"], 1, False, "pipeline.layers", "[]"),
    (["pipeline.layers=7"], 1, False, "pipeline.layers", "7"),
    (["pipeline.layers=[1.5,2]"], 1, False, "pipeline.layers", "1.5"),
    (["generation.temperature=-0.1"], 1, False, "generation.temperature", "-0.1"),
    (["generation.temperature=nan"], 1, False, "generation.temperature", "nan"),
    (["generation.temperature=inf", "generation.top_k=40"], 1, False, "generation.temperature", "inf"),
    (["generation.temperature=-inf"], 1, False, "generation.temperature", "-inf"),
    (["generation.repetition_penalty=inf"], 1, False, "generation.repetition_penalty", "inf"),
    (["generation.repetition_penalty=nan"], 1, False, "generation.repetition_penalty", "nan"),
    (["generation.top_p=inf"], 1, False, "generation.top_p", "inf"),
    (["generation.min_p=nan"], 1, False, "generation.min_p", "nan"),
    (['generation.stop=[""]'], 1, False, "generation.stop[0]", "''"),
    (['generation.stop=["ok",""]'], 1, False, "generation.stop[1]", "''"),
    ([r'generation.stop=["ok","a\q"]'], 1, False, "generation.stop[1]", r"unknown escape \q"),
    (["generation.top_p=0"], 1, False, "generation.top_p", "0"),
    (["generation.top_p=1.5"], 1, False, "generation.top_p", "1.5"),
    (["generation.top_k=-1"], 1, False, "generation.top_k", "-1"),
    (["generation.min_p=-0.5"], 1, False, "generation.min_p", "-0.5"),
    (["generation.min_p=2"], 1, False, "generation.min_p", "2"),
    (["generation.repetition_penalty=0"], 1, False, "generation.repetition_penalty", "0"),
    (["generation.max_new_tokens=-3"], 1, False, "generation.max_new_tokens", "-3"),
    (["generation.max_new_tokens=0"], 1, False, "generation.max_new_tokens", "0"),
    (["runtime.device=tpu"], 1, False, "runtime.device", "tpu"),
    (["runtime.device=cuda"], 1, False, "runtime.device", "cuda"),
    (["runtime.dtype=float64"], 1, False, "runtime.dtype", "float64"),
    (["runtime.threads=0"], 1, False, "runtime.threads", "0"),
    (["runtime.weights=int4"], 1, False, "runtime.weights", "int4"),
    (["runtime.kv_dtype=q4_0"], 1, False, "runtime.kv_dtype", "q4_0"),
    (["runtime.dtype=float16", "runtime.device=cpu"], 1, False, "runtime.dtype", "float16"),
    (["runtime.dtype=float16"], 1, False, "runtime.dtype", "float16"),
    (["runtime.kv_cache_tokens=0"], 1, False, "runtime.kv_cache_tokens", "0"),
    (["runtime.timeout_s=0"], 1, False, "runtime.timeout_s", "0"),
    (["runtime.timeout_s=0.001"], 1, False, "runtime.timeout_s", "0.001"),
    (["runtime.timeout_s=inf"], 1, False, "runtime.timeout_s", "inf"),
    (["runtime.timeout_s=nan"], 1, False, "runtime.timeout_s", "nan"),
    (["runtime.timeout_s=86401"], 1, False, "runtime.timeout_s", "86401"),
    (["input.text=hi"], 1, False, "input.text", "'hi'"),
    (["task=generate", "input.token_ids=[1,2]"], 1, False, "input.token_ids", "[1, 2]"),
    (["task=score", "input.text=hi", 'prompts=["a"]'], 1, False, "prompts", "['a']"),
    (["task=score", "input.text=hi", "prompts_file=p.txt"], 1, False, "prompts_file", "p.txt"),
    (['prompts=["a"]', "prompts_file=p.txt"], 1, False, "prompts_file", "p.txt"),
    (["task=score"], 1, False, "input.token_ids", "None"),
    (["task=score", "input.token_ids=[1]", "input.text=hi"], 1, False, "input.text", "hi"),
    (["task=score", "input.token_ids=[]"], 1, False, "input.token_ids", "[]"),
    (["profile.active=0"], 1, False, "profile.active", "0"),
    (["generation.repetition_penalty=1e30"], 1, False, "generation.repetition_penalty", "1e+30"),
    (["generation.repetition_penalty=1e-300"], 1, False, "generation.repetition_penalty", "1e-300"),
    (["generation.top_k=9223372036854775807"], 1, False, "generation.top_k", "9223372036854775807"),
    (["server.max_queue=0"], 1, False, "server.max_queue", "0"),
    (["server.max_request_bytes=10"], 1, False, "server.max_request_bytes", "10"),
    (["server.max_connections=0"], 1, False, "server.max_connections", "0"),
    (["server.header_timeout_s=0"], 1, False, "server.header_timeout_s", "0"),
    (["server.stall_timeout_s=nan"], 1, False, "server.stall_timeout_s", "nan"),
]


@pytest.mark.parametrize("overrides, world, cuda, key, value", BAD_VALUES)
def test_validation_names_key_and_value(
    hydra_ctx: None, overrides: list[str], world: int, cuda: bool, key: str, value: str
) -> None:
    cfg = _compose(overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size=world, cuda_available=cuda)
    assert key in str(info.value) and value in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, world, cuda",
    [
        ([], 1, False),
        (["runtime.device=cuda", "pipeline.stages=2"], 2, True),
        (["task=score", "input.text=hello", "pipeline.layers=[3,3]"], 2, False),
        (["prompts_file=p.txt", "generation.temperature=0.7", "generation.top_p=1.0"], 1, False),
        (["pipeline.lane_size=1", "pipeline.microbatches=3", "runtime.threads=1"], 3, False),
        (["generation.temperature=1e-40", "generation.top_k=40"], 1, False),
        (["runtime.timeout_s=1", "generation.repetition_penalty=1000", "generation.top_k=2147483647"], 1, False),
        (["runtime.timeout_s=86400"], 1, False),
        (["task=score", "input.token_ids=[5]", "generation.stop=[x]"], 1, False),
    ],
)
def test_valid_configs_pass(hydra_ctx: None, overrides: list[str], world: int, cuda: bool) -> None:
    validate_config(_compose(overrides), world_size=world, cuda_available=cuda)


@pytest.mark.parametrize(
    "override, expected",
    [
        # README's example, as Hydra receives it from `generation.stop='["\n\n"]'` in a shell.
        (r'generation.stop=["\n\n"]', ("\n\n",)),
        (r"generation.stop=['\t', '\u2028', 'a\\b', 'END']", ("\t", "\u2028", "a\\b", "END")),
        ("generation.stop=[]", ()),
    ],
)
def test_stop_strings_decode_escapes_as_hydra_delivers_them(
    hydra_ctx: None, override: str, expected: tuple[str, ...]
) -> None:
    cfg = _compose([override])
    validate_config(cfg, world_size=1, cuda_available=False)
    assert tuple(GenerationParams.from_config(cfg.generation).stop) == expected


def test_validation_accepts_the_plain_dataclass() -> None:
    validate_config(Config(), world_size=1, cuda_available=False)


@pytest.mark.parametrize(
    "device, dtype, cuda, want_device, want_dtype",
    [
        ("auto", None, False, "cpu", torch.float32),
        ("auto", None, True, "cuda", torch.bfloat16),
        ("cpu", None, True, "cpu", torch.float32),
        ("cuda", None, True, "cuda", torch.bfloat16),
        ("cpu", "bfloat16", False, "cpu", torch.bfloat16),
        ("auto", "float16", True, "cuda", torch.float16),
        ("cuda", "float32", True, "cuda", torch.float32),
    ],
)
def test_resolve_device_and_dtype(
    device: str, dtype: str, cuda: bool, want_device: str, want_dtype: torch.dtype
) -> None:
    cfg = Config()
    cfg.runtime.device = device
    cfg.runtime.dtype = dtype
    resolved = resolve_device(cfg, cuda_available=cuda)
    assert resolved == want_device
    assert resolve_dtype(cfg, resolved) == want_dtype


def test_resolve_threads() -> None:
    cfg = Config()
    assert resolve_threads(cfg, local_world_size=4, cpu_count=16) == 4
    assert resolve_threads(cfg, local_world_size=3, cpu_count=2) == 1
    cfg.runtime.threads = 5
    assert resolve_threads(cfg, local_world_size=4, cpu_count=16) == 5


@pytest.mark.parametrize(
    "microbatches, lane_size, stages, sequences, want",
    [
        (None, None, 4, 2, LaneLayout(2, 1)),  # lanes capped by the sequences
        (None, None, 2, 5, LaneLayout(2, 3)),  # ceil(5 / 2) per lane: every sequence placed at once
        (None, None, 4, 8, LaneLayout(4, 2)),
        (2, 1, 4, 5, LaneLayout(2, 1)),  # 2 lanes x 1 row: 3 sequences wait for a free row
        (3, None, 2, 7, LaneLayout(3, 3)),
        (8, None, 2, 3, LaneLayout(3, 1)),
    ],
)
def test_resolve_lanes(
    microbatches: int, lane_size: int, stages: int, sequences: int, want: LaneLayout
) -> None:
    cfg = Config()
    cfg.pipeline.microbatches = microbatches
    cfg.pipeline.lane_size = lane_size
    assert resolve_lanes(cfg, n_stages=stages, n_sequences=sequences) == want


def test_resolve_lanes_rejects_no_sequences() -> None:
    with pytest.raises(ConfigError, match="0 sequences"):
        resolve_lanes(Config(), n_stages=2, n_sequences=0)
