"""Preemption: a KV pool too small for every sequence's full length. Sequences are admitted by
current need; when a decode step finds the pool dry, the newest sequence gives its blocks back
on every stage and is later prefilled again with its prompt and the tokens it had generated.

Reference: the same prompts with a pool large enough for all of them at full length (nothing
preempted). Greedy tokens, and sampled ones with a seed and penalties, must be identical, and
the preemptions counted in metrics.json and TensorBoard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_driver import Run, run_all, run_command, torchrun_command
from pipeline_models import ADD_BOS, PIPELINE_SPECS, TokenizerChoice, write_pipeline_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppinfer.model.cache import BLOCK_SIZE
from ppinfer.pipeline.job import DistEnv
from ppinfer.pipeline.sequence import Sequence
from ppinfer.sampling.params import GenerationParams

PROMPTS = ("the cat in the hat sat on the mat", "x", "pipelines keep every stage busy", "Hi there",
           "1 2 3 4 5 6 7 8 9 10 11 12", "gloo on cpu")
MAX_NEW = 40
ROW = 80  # slots of one row: the longest prompt plus its budget, in whole blocks
SMALL_POOL = ROW + BLOCK_SIZE  # tokens of each stage's pool: one row and a block, for 4 rows


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preempt") / "llama.gguf"
    return write_pipeline_model(path, PIPELINE_SPECS["llama"], TokenizerChoice(add_bos=ADD_BOS["llama"]))


def overrides(model: Path, out: Path, *more: str) -> list[str]:
    prompts = "[" + ",".join(f"'{p}'" for p in PROMPTS) + "]"
    return [f"model.path={model}", f"output.dir={out}", f"prompts={prompts}", f"generation.max_new_tokens={MAX_NEW}",
            "generation.ignore_eos=true", "runtime.kv_dtype=float32", "pipeline.microbatches=2",
            "pipeline.lane_size=2", *more]


def tokens(out: Path) -> list[list[int]]:
    return [json.loads(line)["token_ids"] for line in (out / "results.jsonl").read_text().splitlines()]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prompts with a pool that holds every row at full length."""
    out = tmp_path_factory.mktemp("large")
    run_all([Run("large", tuple(overrides(model, out)))], DistEnv(0, 1, 0, 1))
    assert metrics(out)["preemptions"] == 0
    return out


def test_greedy_tokens_with_a_small_pool_equal_a_large_pool(model: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    run_all([Run("small", tuple(overrides(model, out, f"runtime.kv_cache_tokens={SMALL_POOL}",
                                          "profile=tensorboard")))], DistEnv(0, 1, 0, 1))
    assert tokens(out) == tokens(reference)
    assert all(len(t) == MAX_NEW for t in tokens(out))
    counted = metrics(out)["preemptions"]
    assert counted > 0, "the pool never ran dry: the test does not exercise preemption"
    events = list((out / "tensorboard" / "rank0").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("kv_cache/preemptions")[0].value == counted


SAMPLED = ("generation.temperature=0.8", "generation.seed=3", "generation.repetition_penalty=1.1",
           "generation.presence_penalty=0.5", "generation.frequency_penalty=0.3")
"""Settings with a random stream and penalty counts, which the last stage must rebuild for a
resumed sequence."""


@pytest.fixture(scope="module")
def sampled_reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prompts sampled (`SAMPLED`) with a pool that holds every row at full length."""
    out = tmp_path_factory.mktemp("large-sampled")
    run_all([Run("large", tuple(overrides(model, out, *SAMPLED)))], DistEnv(0, 1, 0, 1))
    assert metrics(out)["preemptions"] == 0
    return out


def test_sampled_tokens_with_a_small_pool_equal_a_large_pool(
    model: Path, sampled_reference: Path, tmp_path: Path
) -> None:
    """Sampled sequences with penalties are preempted and resumed: their random streams go on
    where they stood and their penalties count the tokens generated before, so every token
    equals the large pool's."""
    out = tmp_path / "small"
    run_all([Run("small", tuple(overrides(model, out, f"runtime.kv_cache_tokens={SMALL_POOL}", *SAMPLED)))],
            DistEnv(0, 1, 0, 1))
    assert metrics(out)["preemptions"] > 0, "the pool never ran dry: the test does not exercise preemption"
    assert tokens(out) == tokens(sampled_reference)


GRAMMAR = "generation.grammar='start: /[a-z]{25}[0-9]{25}/'"
"""A grammar whose mask depends on how far the matcher has gone (letters, then digits)."""


def test_constrained_tokens_with_a_small_pool_equal_a_large_pool(model: Path, tmp_path: Path) -> None:
    """A sequence with a grammar is resumed with a matcher that has consumed its tokens so far:
    letters until the 25th, digits after, as with a large pool."""
    small, large = tmp_path / "small", tmp_path / "large"
    run_all([Run("small", tuple(overrides(model, small, f"runtime.kv_cache_tokens={SMALL_POOL}", *SAMPLED, GRAMMAR))),
             Run("large", tuple(overrides(model, large, *SAMPLED, GRAMMAR)))], DistEnv(0, 1, 0, 1))
    assert metrics(small)["preemptions"] > 0, "the pool never ran dry: the test does not exercise preemption"
    assert metrics(large)["preemptions"] == 0
    texts = [json.loads(line)["text"] for line in (large / "results.jsonl").read_text().splitlines()]
    assert all(t[:25].isalpha() and t[25:50].isdigit() for t in texts), texts
    assert tokens(small) == tokens(large)


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True])
def test_preemption_across_two_stages(
    model: Path, sampled: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two ranks: the preempted rows' blocks are given back on both stages (the release goes
    down the ring before the next item), and the tokens (greedy, or sampled with penalties)
    equal the large pool's on one."""
    reference = request.getfixturevalue("sampled_reference" if sampled else "reference")
    out = tmp_path / "two"
    args = overrides(model, out, f"runtime.kv_cache_tokens={SMALL_POOL}", *(SAMPLED if sampled else ()))
    done = run_command(torchrun_command("--standalone", "--nproc_per_node=2", "launch/infer.py", *args), 240)
    assert done.returncode == 0, done.tail()
    assert tokens(out) == tokens(reference)
    assert metrics(out)["preemptions"] > 0


@pytest.mark.parametrize(
    "settings",
    [{"temperature": 0.0}, {"temperature": 0.8}, {"repetition_penalty": 1.1}, {"presence_penalty": 0.5},
     {"logprobs": 2, "prompt_logprobs": 1}, {"response_format": {"type": "json_object"}},
     {"grammar": 'start: "yes" | "no"'}],
)
def test_every_generated_sequence_is_preemptable(settings: dict) -> None:
    """The last stage rebuilds a resumed sequence's random stream, penalty counts, history and
    grammar state from its admission; a scored sequence is never preempted (it generates
    nothing to grow into)."""
    assert Sequence(0, [1, 2], GenerationParams(**settings), 0).preemptable
    assert not Sequence(0, [1, 2], GenerationParams(**settings), 0, scored=True).preemptable
