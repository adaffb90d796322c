"""Layer allocation (`allocate`, `plan_table`), the GGUF cost model (`layer_costs`) and what a
prepared job sizes its lanes, chunks and buffers for.

Balanced splits are checked against hand-derived cases and against a brute-force search over
every contiguous split; byte counts against sizes worked out from the tensor shapes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import GGMLQuantizationType as QType
from pipeline_driver import compose_config
from pipeline_models import PIPELINE_SPECS, write_pipeline_model

from ppinfer.errors import ConfigError, ModelFileError
from ppinfer.gguf import GGUFFile
from ppinfer.pipeline.job import DistEnv, Job, prepare
from ppinfer.pipeline.wire import (
    Admission,
    Control,
    LinkSizes,
    Msg,
    decode_admissions,
    decode_release,
    encode_admissions,
    encode_release,
)
from ppinfer.pipeline.work import ItemKind, RowStep, WorkItem
from ppinfer.plan.allocation import LayerCosts, allocate, parse_layers, plan_table
from ppinfer.plan.costs import layer_costs
from ppinfer.sampling.params import GenerationParams

MIB = 1024 * 1024


def _costs(
    weights: Sequence[int], embedding: int = 0, head: int = 0, kv: Sequence[int] | None = None
) -> LayerCosts:
    return LayerCosts(
        layer_weight_bytes=list(weights),
        layer_kv_bytes=list(kv) if kv is not None else [0] * len(weights),
        embedding_bytes=embedding,
        head_bytes=head,
    )


# ---------------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    "n_layers, n_stages, want",
    [
        (30, 4, [8, 8, 7, 7]),
        (7, 3, [3, 2, 2]),
        (4, 4, [1, 1, 1, 1]),
        (6, 1, [6]),
        (9, 3, [3, 3, 3]),
    ],
)
def test_uniform(n_layers: int, n_stages: int, want: list[int]) -> None:
    # Uniform ignores costs: a heavy head does not change it.
    assert allocate("uniform", n_stages, _costs([1] * n_layers, head=100)) == want


@pytest.mark.parametrize(
    "costs, n_stages, want",
    [
        # Equal layers, nothing extra: an even split.
        (_costs([10] * 6), 3, [2, 2, 2]),
        # The head weighs two layers: the last stage gives up two layers (40 vs 20 + 20).
        (_costs([10] * 6, head=20), 2, [4, 2]),
        # The embedding weighs two layers: the first stage gives up two layers.
        (_costs([10] * 6, embedding=20), 2, [2, 4]),
        # Head of 30 on 3 stages of 7 layers: (3, 3, 1) costs (30, 30, 40); (3, 3, 1) is
        # the only split with max 40 since the last stage needs >= 1 layer and a layer + head
        # is already 40; the first two stages then split 6 layers 3/3 (squares 900 + 900
        # beat 4/2's 1600 + 400).
        (_costs([10] * 7, head=30), 3, [3, 3, 1]),
        # KV bytes count like weights: layer 0 has a huge cache, so it stands alone.
        (_costs([10] * 4, kv=[30, 0, 0, 0]), 2, [1, 3]),
        # Among max-4 splits of (1,1,1,1,4): (2,2,1) has squares 24, (3,1,1) and (1,3,1) 26.
        (_costs([1, 1, 1, 1, 4]), 3, [2, 2, 1]),
        # Exact tie (costs 30/20 or 20/30): more layers go to the earlier stage.
        (_costs([10] * 5), 2, [3, 2]),
        # One stage takes everything.
        (_costs([5, 6, 7], embedding=3, head=9), 1, [3]),
    ],
)
def test_balanced_hand_derived(costs: LayerCosts, n_stages: int, want: list[int]) -> None:
    assert allocate("balanced", n_stages, costs) == want


def _stage_costs(split: Sequence[int], costs: LayerCosts) -> list[int]:
    """Stage costs computed directly from the definition, for the brute-force reference."""
    out, start = [], 0
    for s, n in enumerate(split):
        c = sum(costs.layer_weight_bytes[start : start + n]) + sum(
            costs.layer_kv_bytes[start : start + n]
        )
        c += costs.embedding_bytes if s == 0 else 0
        c += costs.head_bytes if s == len(split) - 1 else 0
        out.append(c)
        start += n
    return out


def _all_splits(n_layers: int, n_stages: int) -> list[tuple[int, ...]]:
    splits = []
    for cuts in itertools.combinations(range(1, n_layers), n_stages - 1):
        bounds = (0, *cuts, n_layers)
        splits.append(tuple(b - a for a, b in itertools.pairwise(bounds)))
    return splits


def test_balanced_matches_brute_force() -> None:
    """The documented rule: min max cost, then min sum of squares, then earlier stages longer."""
    rng = random.Random(1234)
    for _ in range(300):
        n_layers = rng.randint(1, 9)
        n_stages = rng.randint(1, n_layers)
        costs = _costs(
            [rng.randint(1, 6) for _ in range(n_layers)],
            embedding=rng.randint(0, 12),
            head=rng.randint(0, 12),
            kv=[rng.randint(0, 3) for _ in range(n_layers)],
        )

        def rank(split: tuple[int, ...], costs: list[int] = costs) -> tuple[int, int, list[int]]:
            stage = _stage_costs(split, costs)
            return max(stage), sum(c * c for c in stage), [-n for n in split]

        want = min(_all_splits(n_layers, n_stages), key=rank)
        assert allocate("balanced", n_stages, costs) == list(want), (costs, n_stages)


# ------------------------------------------------------------------- explicit and errors


def test_explicit_list_is_returned() -> None:
    assert allocate([2, 1, 3], 3, _costs([1] * 6)) == [2, 1, 3]


@pytest.mark.parametrize(
    "layers, n_stages, must_name",
    [
        ([3, 3], 3, ["[3, 3]", "sum 6", "6 layers", "2 entries for 3 stages"]),
        ([3, 2], 2, ["[3, 2]", "sum 5", "6 layers"]),
        ([4, 4], 2, ["[4, 4]", "sum 8", "6 layers"]),
        ([6, 0], 2, ["[6, 0]", "sum 6", "6 layers", "at least one layer"]),
        ([7, -1], 2, ["[7, -1]", "sum 6", "6 layers", "at least one layer"]),
    ],
)
def test_explicit_list_errors(layers: list[int], n_stages: int, must_name: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        allocate(layers, n_stages, _costs([1] * 6))
    for text in must_name:
        assert text in str(info.value)


@pytest.mark.parametrize("policy", ["balanced", "uniform", [1, 1, 1, 1, 1]])
def test_more_stages_than_layers(policy: object) -> None:
    with pytest.raises(ConfigError, match=r"5 pipeline stages.*only 4 layers"):
        allocate(policy, 5, _costs([1] * 4))


@pytest.mark.parametrize("bad", ["balance", "", [], [1.0, 2.0], [True, False], 3, None, {"a": 1}])
def test_parse_layers_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"pipeline.layers"):
        parse_layers(bad)


def test_parse_layers_accepts_list_config() -> None:
    from omegaconf import OmegaConf

    assert parse_layers(OmegaConf.create([8, 8, 7, 7])) == [8, 8, 7, 7]
    assert parse_layers((2, 3)) == [2, 3]
    assert parse_layers("uniform") == "uniform"


def test_plan_table() -> None:
    costs = _costs([1 * MIB, 1 * MIB, 2 * MIB], embedding=MIB, head=3 * MIB, kv=[MIB // 2] * 3)
    rows = plan_table([2, 1], costs).splitlines()
    assert len(rows) == 3
    assert rows[0].split()[:3] == ["rank", "layers", "n"]
    # rank 0: layers 0-1, 2 layers, 1 + 1 + 1 (embedding) MiB weights, 2 x 0.5 MiB KV.
    assert rows[1].split() == ["0", "0-1", "2", "3.00", "1.00", "embedding"]
    # rank 1: layer 2 alone, 2 + 3 (head) MiB weights, 0.5 MiB KV.
    assert rows[2].split() == ["1", "2-2", "1", "5.00", "0.50", "head"]
    # Fixed width: the last column starts at the same offset on every row.
    assert len({len(r) - len(r.split()[-1]) for r in rows}) == 1
    # A single stage carries both ends.
    single = plan_table([3], costs).splitlines()
    assert single[1].split()[-1] == "embedding+head"


# ------------------------------------------------------------------------- cost model


def _f32(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def _write_tiny(
    path: Path,
    *,
    tied: bool,
    head_count_kv: object = 1,
    key_length: int | None = None,
    extra_block: bool = False,
) -> None:
    """A 2-layer llama-shaped GGUF: E=8, 2 heads, vocab 16, token_embd stored as F16."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(head_count_kv)  # type: ignore[arg-type]
    if key_length is not None:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float16))
    for layer in range(3 if extra_block else 2):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", _f32(8))
        w.add_tensor(f"blk.{layer}.attn_q.weight", _f32(8, 8))
        w.add_tensor(f"blk.{layer}.attn_k.weight", _f32(4, 8))
        w.add_tensor(f"blk.{layer}.attn_v.weight", _f32(4, 8))
        w.add_tensor(f"blk.{layer}.ffn_up.weight", _f32(12, 8))
    w.add_tensor("output_norm.weight", _f32(8))
    if not tied:
        w.add_tensor("output.weight", _f32(16, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_layer_costs_tiny_untied(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_tiny(path, tied=False)
    costs = layer_costs(str(path), dtype_bytes=2, kv_tokens=10)
    # Per layer: 8 + 64 + 32 + 32 + 96 = 232 elements at 2 bytes.
    assert costs.layer_weight_bytes == [464, 464]
    # token_embd kept as stored: 16 * 8 F16 values = 256 bytes.
    assert costs.embedding_bytes == 256
    # Head: output_norm (8) + output (128) elements at 2 bytes.
    assert costs.head_bytes == 272
    # head_dim = 8 / 2 = 4: 10 tokens * 1 KV head * (4 + 4) * 2 bytes.
    assert costs.layer_kv_bytes == [160, 160]


def test_layer_costs_tiny_tied_per_layer_kv(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    _write_tiny(path, tied=True, head_count_kv=[1, 2], key_length=6)
    costs = layer_costs(str(path), dtype_bytes=4, kv_tokens=3)
    assert costs.layer_weight_bytes == [928, 928]
    assert costs.embedding_bytes == 256
    # Tied: output_norm (8) + token_embd dequantized (128) elements at 4 bytes.
    assert costs.head_bytes == 544
    # key/value length 6 from the header; 1 then 2 KV heads: 3 * h * 12 * 4.
    assert costs.layer_kv_bytes == [144, 288]
    # An already opened reader gives the same answer without parsing the file again.
    assert layer_costs(str(path), dtype_bytes=4, kv_tokens=3, reader=GGUFFile(str(path))) == costs


def test_layer_costs_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"not found.*missing.gguf"):
        layer_costs(str(tmp_path / "missing.gguf"), dtype_bytes=2, kv_tokens=1)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError, match=r"junk.gguf"):
        layer_costs(str(junk), dtype_bytes=2, kv_tokens=1)
    extra = tmp_path / "extra.gguf"
    _write_tiny(extra, tied=True, extra_block=True)
    with pytest.raises(ModelFileError, match=r"blk\.2\..*block_count=2"):
        layer_costs(str(extra), dtype_bytes=2, kv_tokens=1)


@pytest.mark.slow
def test_layer_costs_smollm2(smollm2_path: str) -> None:
    costs = layer_costs(smollm2_path, dtype_bytes=2, kv_tokens=100)
    assert costs.n_layers == 30
    # Architecture: E=576, FFN=1536, 9 heads of 64, 3 KV heads. Per layer: q and o 576x576,
    # k and v 576x192, gate/up/down 576x1536, two norms of 576 -> elements at 2 bytes.
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert costs.layer_weight_bytes == [2 * per_layer] * 30
    # token_embd is Q8_0 [49152, 576]: 34-byte blocks of 32 values, kept quantized.
    assert costs.embedding_bytes == 49152 * 576 // 32 * 34
    # Tied (no output tensor): output_norm + token_embd dequantized to 2 bytes.
    assert costs.head_bytes == 2 * (576 + 49152 * 576)
    assert costs.layer_kv_bytes == [100 * 3 * (64 + 64) * 2] * 30

    split = allocate("balanced", 4, costs)
    assert sum(split) == 30 and min(split) >= 1
    # The head (~8 layers' worth) leaves the last stage the fewest layers.
    assert split[-1] == min(split) and split[-1] < 7
    best = min(max(_stage_costs(s, costs)) for s in _all_splits(30, 4))
    assert max(_stage_costs(split, costs)) == best
    assert plan_table(split, costs).count("\n") == 4


@pytest.mark.slow
def test_layer_costs_smollm2_with_stored_blocks(smollm2_path: str) -> None:
    """With quantized weights held as blocks, a layer costs its Q4_1 bytes (20-byte blocks of
    32 values) and the tied head its Q8_0 bytes (34 per 32); norms stay float."""
    costs = layer_costs(
        smollm2_path, dtype_bytes=4, kv_tokens=100, step_tokens=1, stored_types={QType.Q4_1, QType.Q8_0}
    )
    matrices = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert costs.layer_weight_bytes == [matrices // 32 * 20 + 4 * 2 * 576] * 30
    assert costs.head_bytes == 4 * 576 + 49152 * 576 // 32 * 34
    split = allocate("balanced", 2, costs)
    assert split[1] < split[0]  # a decode step reads the whole head but one embedding row


def test_quantized_types_are_reported_as_file_bytes(tmp_path: Path) -> None:
    """An embedding stored as Q8_0 costs its packed size (34 bytes per 32 values)."""
    path = tmp_path / "q8.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(1)
    raw = np.zeros((4, 34), dtype=np.uint8)  # 4 rows of one Q8_0 block each
    w.add_tensor("token_embd.weight", raw, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", _f32(32, 32))
    w.add_tensor("output_norm.weight", _f32(32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    costs = layer_costs(str(path), dtype_bytes=2, kv_tokens=5)
    assert costs.embedding_bytes == 4 * 34
    assert costs.head_bytes == 2 * (32 + 4 * 32)
    # No head_count_kv key: one KV head per query head, head_dim 32.
    assert costs.layer_kv_bytes == [5 * 1 * 64 * 2]


# ------------------------------------------------- what a prepared run is sized for

TINY = PIPELINE_SPECS["llama"]
TWO_PROMPTS = "prompts=['the cat in the hat','pipelines keep every stage busy']"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 6-layer llama of the pipeline tests, with its byte-level tokenizer."""
    return write_pipeline_model(tmp_path_factory.mktemp("sizing") / "llama.gguf", TINY)


def _prepared(model: Path, out: Path, stages: int, *overrides: str) -> Job:
    """Rank 0's job for a run on `stages` ranks, as `launch/infer.py` would prepare it."""
    cfg = compose_config((f"model.path={model}", f"output.dir={out}", "runtime.device=cpu",
                          "runtime.dtype=float32", "generation.max_new_tokens=4", *overrides))
    env = DistEnv(rank=0, world=stages, local_rank=0, local_world=stages)
    return prepare(cfg, env, cuda_available=False, family_given=False)


def test_lane_size_beyond_the_prompts_sizes_the_lane_it_really_holds(tiny_model: Path, tmp_path: Path) -> None:
    """`pipeline.lane_size=1e9` with 2 prompts: one lane of those 2, and the balanced split is
    the one of `lane_size=2` (the same run) and of the default lanes, not one that charges the
    first stage a billion embedding rows per step."""
    huge = _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, "pipeline.lane_size=1000000000")
    assert (huge.lane_size, len(huge.prompts), huge.n_lanes) == (2, 2, 1)
    exact = _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, "pipeline.lane_size=2")
    default = _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS)
    assert huge.layers == exact.layers == default.layers
    assert min(huge.layers) > 1


def test_huge_prefill_chunk_is_capped_by_the_longest_prompt(tiny_model: Path, tmp_path: Path) -> None:
    """`pipeline.prefill_chunk=1e8` with short prompts: the run issues chunks no longer than
    its longest prompt, and the receive buffer holds one such chunk of the fullest lane."""
    job = _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, "pipeline.lane_size=1000000000",
                    "pipeline.prefill_chunk=100000000")
    longest = max(len(p) for p in job.prompts)
    assert job.prefill_chunk == longest < 100
    sizes = LinkSizes.of(TINY.n_embd, job.lane_size, job.prefill_chunk, job.dtype, stages=2)
    # Control block: 10 header words, 1 busy word per stage, 4 words per row (row, seq,
    # first_pos, reset) = 10 + 2 + 2 * 4 = 20 int64 words.
    assert sizes.control_words == 20
    # A decode step inline: control, 2 x 1 input ids, 2 x 1 x E float32 values.
    assert sizes.item_bytes == (20 + 2) * 8 + 2 * TINY.n_embd * 4
    assert sizes.token_bytes == (20 + 2) * 8
    # 2 rows x the longest prompt, each token an int64 id and E float32 values.
    assert sizes.large_bytes == 2 * longest * (8 + TINY.n_embd * 4)
    # A chunk shorter than the prompts is kept as configured.
    assert _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, "pipeline.prefill_chunk=3").prefill_chunk == 3


def test_refill_chunk_as_set_and_never_above_the_prefill_chunk(tiny_model: Path, tmp_path: Path) -> None:
    """A group admitted next to decoding rows goes in chunks of `pipeline.refill_chunk` (16 by
    default), never longer than the prefill chunk (the link sizes its buffers for that one)."""
    lanes = ("pipeline.lane_size=2", "pipeline.prefill_chunk=100")
    assert _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, *lanes).refill_chunk == 16
    assert _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, *lanes, "pipeline.refill_chunk=3").refill_chunk == 3
    job = _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, "pipeline.lane_size=2", "pipeline.prefill_chunk=3",
                    "pipeline.refill_chunk=50")
    assert (job.prefill_chunk, job.refill_chunk) == (3, 3)
    scheduler = job.scheduler()
    assert (scheduler.chunk, scheduler.refill_chunk, scheduler.lane_size) == (3, 3, 2)


def test_kv_pool_size_default_and_minimum(tiny_model: Path, tmp_path: Path) -> None:
    """The pool holds every row at its full length by default (2 rows of the longest prompt
    plus 4 new tokens, rounded up to blocks of 16), a configured size is rounded up to whole
    blocks, and one below a full row is an error naming the value and the minimum. The KV
    bytes of the split follow the KV dtype: float16 halves them."""
    job = _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS)
    row = -(-job.capacity // 16) * 16
    assert job.kv_dtype == torch.float16 and job.kv_tokens == 2 * row
    assert _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, f"runtime.kv_cache_tokens={row + 1}").kv_tokens == row + 16
    with pytest.raises(ConfigError, match=rf"runtime.kv_cache_tokens={row - 1}: must be at least {row}"):
        _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, f"runtime.kv_cache_tokens={row - 1}")
    costs = {
        dtype: layer_costs(str(tiny_model), 4, 1000, kv_dtype_bytes=size) for dtype, size in (("16", 2), ("32", 4))
    }
    assert [2 * b for b in costs["16"].layer_kv_bytes] == costs["32"].layer_kv_bytes
    q8 = layer_costs(str(tiny_model), 4, 1024, kv_dtype_bytes=34 / 32).layer_kv_bytes
    assert [b * 128 for b in q8] == [b * 34 for b in layer_costs(str(tiny_model), 4, 1024).layer_kv_bytes]


def test_q8_0_kv_needs_head_sizes_of_whole_blocks(tiny_model: Path, tmp_path: Path) -> None:
    """The tiny model's heads of 16 values cannot be cut into Q8_0 blocks of 32: one line
    naming the value, before any process group exists."""
    with pytest.raises(ConfigError, match=r"runtime\.kv_dtype=q8_0: head size 16 is not a multiple of 32"):
        _prepared(tiny_model, tmp_path, 2, TWO_PROMPTS, "runtime.kv_dtype=q8_0")


def test_score_sizes_for_its_one_long_sequence(tiny_model: Path, tmp_path: Path) -> None:
    """`score` is one lane of one sequence: the chunk is capped by that sequence's length."""
    ids = list(range(40, 100))
    score = ("task=score", f"input.token_ids=[{','.join(map(str, ids))}]")
    job = _prepared(tiny_model, tmp_path, 2, *score, "pipeline.prefill_chunk=100000000")
    assert (job.lane_size, job.prefill_chunk) == (1, len(ids))
    sizes = LinkSizes.of(TINY.n_embd, job.lane_size, job.prefill_chunk, job.dtype, stages=2)
    assert sizes.large_bytes == len(ids) * (8 + TINY.n_embd * 4)
    assert _prepared(tiny_model, tmp_path, 2, *score, "pipeline.prefill_chunk=16").prefill_chunk == 16


def test_control_block_fits_its_words_and_round_trips() -> None:
    """A control block of a full lane encodes to exactly `control_words` int64 words (the
    buffers hold no more), and decodes to the same item and busy times; an admission's block
    carries its payload size."""
    rows = (RowStep(0, 7, -2, reset=True), RowStep(2, 8, -1), RowStep(5, 9, 5))
    control = Control(Msg.ITEM, WorkItem(1, ItemKind.PREFILL, rows, 4, True), (0.25, 1.5, 0.0))
    words = control.encode(3)
    assert len(words) == LinkSizes.of(16, 3, 4, torch.float32, stages=3).control_words == 10 + 3 + 3 * 4
    assert Control.decode(words, 3) == control
    # A decode step of rows 1 and 4 with a chunk of rows 0, 2 and 3 folded in: 5 rows of a lane of 5.
    chunk = WorkItem(1, ItemKind.PREFILL, (RowStep(0, 7, 3), RowStep(2, 8, 0, reset=True), RowStep(3, 9, -1)), 4, True)
    step = WorkItem(1, ItemKind.DECODE, (RowStep(1, 3, 40), RowStep(4, 5, 12)), 1, True, folded=chunk)
    folded = Control(Msg.ITEM, step, (0.5, 0.0, 0.0))
    words = folded.encode(3)
    assert len(words) == LinkSizes.of(16, 5, 4, torch.float32, stages=3).control_words
    assert Control.decode(words, 3) == folded and step.tokens == 2 + 3 * 4
    admit = Control(Msg.ADMIT, busy_s=(0.0, 0.0, 0.0), payload=1234)
    assert Control.decode(admit.encode(3) + [0] * 12, 3) == admit
    release = Control(Msg.RELEASE, busy_s=(0.0, 0.0, 0.0), payload=17)
    assert Control.decode(release.encode(3) + [0] * 12, 3) == release
    assert decode_release(encode_release([(0, 3), (2, 1)])) == [(0, 3), (2, 1)]


def test_admissions_round_trip_exactly() -> None:
    """Settings reach the last stage as they were made: floats bit-exact (1e-40, 0.1), a
    63-bit stream seed and stop strings with any character intact."""
    admissions = [
        Admission(7, 2**63 - 1, GenerationParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05,
                                                 repetition_penalty=1.1, stop=["\n\n", "é\u2028"])),
        Admission(8, 0, GenerationParams()),
        Admission(9, 12345, GenerationParams(temperature=1e-40, top_p=0.1, seed=None)),
    ]
    assert decode_admissions(encode_admissions(admissions)) == admissions
