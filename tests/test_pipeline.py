"""Pipelined runs over gloo on CPU give what one process gives.

The reference is the single-process run (S = 1, plain python, no process group), itself held
here to an independent one: a greedy loop that recomputes the whole sequence with the model's
one-stage forward at every step (no KV cache, no padding, no lanes, no chunks), truncated by
hand at the first end-of-generation id; and one full forward for `score`.

Each pipelined stage count S in {2, 3, 4} is one `torchrun` launch of `pipeline_driver.py`
running every configuration in one process group: tiny llama, qwen3 and gemma2 (sliding
window 4) models and the real SmolLM2, with layer allocations uniform / balanced / an uneven
explicit list, M in {1, 2, 3, 5} lanes, prompts of different lengths sharing a lane, prefill
chunks of 1, 3, 4 or 5 tokens (smaller than most prompts) or of 10^8 (sized by the prompts,
not by the setting), more sequences than lanes x lane_size
(waves), sequences ending on EOS at different steps, seeded sampling, and `score`.
Then the real entry point: `launch/infer.py` on 4 ranks with no overrides, and two torchrun
agents on loopback as two nodes of 2 ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pipeline_driver import (
    Finished,
    Run,
    free_port,
    run_all,
    run_command,
    start_command,
    torchrun_command,
    wait_command,
    write_runs,
)
from pipeline_models import (
    ADD_BOS,
    EOS_TEXT,
    PIPELINE_SPECS,
    VOCAB,
    TokenizerChoice,
    greedy_recompute,
    one_forward,
    one_thread,
    pick_eos,
    truncate_at,
    write_pipeline_model,
)
from stage_runner import whole

from ppinfer.errors import PPInferError
from ppinfer.model import PipelineStage
from ppinfer.pipeline.job import DEFAULT_PROMPTS, DistEnv
from ppinfer.text.tokenizer import load_tokenizer

TINY = tuple(PIPELINE_SPECS)
STAGES = (2, 3, 4)
LAUNCH_TIMEOUT_S = 240.0
"""A hung launch fails the test after this long (gloo's own timeout is 60 s)."""

PROMPTS = ("the cat in the hat", "x", "pipelines keep every stage busy", "Hi", "1 2 3")
# The last two start with a prompt admitted earlier without padding: their rows start on its
# cached first block on every stage (prefix caching, a 16-slot block of byte tokens).
WAVE_PROMPTS = (*PROMPTS, "in the end", "gloo on cpu", "pipelines keep every stage busy on cpu",
                "pipelines keep every stage busy on gpu")
MAX_NEW = 10
SCORE_IDS = [(7 * i + 3) % 256 for i in range(20)]
SAMPLING = {
    "generation.temperature": "0.8",
    "generation.top_k": "40",
    "generation.top_p": "0.9",
    "generation.seed": "7",
    "generation.repetition_penalty": "1.2",
}
EXPLICIT = {1: [6], 2: [5, 1], 3: [1, 4, 1], 4: [2, 1, 1, 2]}
UNIFORM = {2: [3, 3], 3: [2, 2, 2], 4: [2, 2, 1, 1]}  # 6 layers; the first 6 mod S stages take one more
SMOL_EXPLICIT = {1: [30], 2: [20, 10], 3: [6, 12, 12], 4: [3, 9, 9, 9]}
SMOL_NEW = 8
SMOL_SCORE_TEXT = "The ocean covers most of the Earth, and"

TINY_KINDS = ("balanced", "uniform-chunk3", "explicit-m5-eos", "waves-eos", "m1", "sampled-m3", "sampled-m1", "score")
GREEDY_KINDS = ("balanced", "uniform-chunk3", "m1")
EOS_KINDS = ("explicit-m5-eos", "waves-eos", "waves-apart-eos")
CASES = [(m, k) for m in TINY for k in TINY_KINDS] + [
    ("llama", "waves-apart-eos"),  # refill chunks apart from the decode steps (pipeline.fold_refill=false)
    ("smollm2", "greedy"),
    ("smollm2", "quantized"),
    ("smollm2", "score"),
]
GENERATE_NAMES = [f"{m}-{k}" for m, k in CASES if k != "score"]
SCORE_NAMES = [f"{m}-{k}" for m, k in CASES if k == "score"]


def hydra_list(values: list[str] | list[int] | tuple[str, ...]) -> str:
    """A Hydra override value for a list (strings quoted; the test prompts hold no quotes)."""
    return "[" + ",".join(f"'{v}'" if isinstance(v, str) else str(v) for v in values) + "]"


def case_overrides(model: str, kind: str, stages: int) -> dict[str, str]:
    """The overrides of one configuration (besides model.path and output.dir)."""
    if model == "smollm2":
        # greedy and score are compared with one whole-sequence forward of the exact path
        # (dequantized weights, float32 KV cache); quantized (the default) is compared across
        # stage counts and with the default command line.
        exact = {"runtime.weights": "dequantized", "runtime.kv_dtype": "float32"}
        greedy = {"generation.max_new_tokens": str(SMOL_NEW), "pipeline.layers": hydra_list(SMOL_EXPLICIT[stages]),
                  "pipeline.microbatches": "3", "pipeline.lane_size": "1", "pipeline.prefill_chunk": "5"}
        if kind == "greedy":  # DEFAULT_PROMPTS: the default command line's
            return {**exact, **greedy}
        if kind == "quantized":  # the default command line's lanes: one prompt each, whole-prompt prefill
            return {**greedy, "pipeline.microbatches": "4", "pipeline.prefill_chunk": "128"}
        return {**exact, "task": "score", "input.text": f"'{SMOL_SCORE_TEXT}'", "pipeline.layers": "uniform",
                "pipeline.prefill_chunk": "4"}
    # The tiny models run the exact path (their weights are float32): a float32 KV cache.
    base = {"prompts": hydra_list(PROMPTS), "generation.max_new_tokens": str(MAX_NEW), "runtime.kv_dtype": "float32"}
    explicit = hydra_list(EXPLICIT[stages])
    waves = {
        "pipeline.layers": "uniform",
        "pipeline.microbatches": "2",
        "pipeline.lane_size": "2",
        "pipeline.prefill_chunk": "4",
        "pipeline.refill_chunk": "1",
        "prompts": hydra_list(WAVE_PROMPTS),
    }
    per_kind = {
        # A chunk far longer than any prompt must cost nothing (buffers sized by the prompts).
        "balanced": {"pipeline.layers": "balanced", "pipeline.prefill_chunk": "100000000"},
        "uniform-chunk3": {"pipeline.layers": "uniform", "pipeline.microbatches": "2", "pipeline.prefill_chunk": "3"},
        "explicit-m5-eos": {"pipeline.layers": explicit, "pipeline.microbatches": "5"},
        # Refills (7 prompts, 4 rows) go one token per chunk, folded into their decoding
        # neighbour's steps, or (apart) as items of their own between them.
        "waves-eos": waves,
        "waves-apart-eos": {**waves, "pipeline.fold_refill": "false"},
        "m1": {"pipeline.layers": "balanced", "pipeline.microbatches": "1", "pipeline.prefill_chunk": "1"},
        "sampled-m3": {**SAMPLING, "pipeline.layers": "uniform", "pipeline.microbatches": "3"},
        "sampled-m1": {
            **SAMPLING,
            "pipeline.layers": explicit,
            "pipeline.microbatches": "1",
            "pipeline.prefill_chunk": "3",
        },
        "score": {
            "task": "score",
            "input.token_ids": hydra_list(SCORE_IDS),
            "pipeline.layers": explicit,
            "pipeline.prefill_chunk": "3",
            "prompts": "null",
        },  # score reads no prompts
    }[kind]
    return {**base, **per_kind}


@dataclass
class Suite:
    """The model files, the independent greedy continuations and the runs of every S."""

    root: Path
    files: dict[str, Path]  # model name, and "<tiny>-eos" for the EOS variant
    prompt_ids: dict[str, list[list[int]]]  # tiny model -> ids of WAVE_PROMPTS
    recomputed: dict[str, list[list[int]]]  # tiny model -> greedy continuation of WAVE_PROMPTS
    eog: dict[str, set[int]]  # file key -> ids that end generation in it

    def runs(self, stages: int) -> dict[str, Run]:
        """Every configuration on `stages` ranks. One torch thread per rank whatever S, so
        every stage count runs the same kernels (and 4 ranks fit 2 cores)."""
        out = {}
        for model, kind in CASES:
            name = f"{model}-{kind}"
            file = self.files[f"{model}-eos" if kind in EOS_KINDS else model]
            overrides = {"model.path": str(file), "output.dir": str(self.root / f"S{stages}" / name),
                         "runtime.device": "cpu", "runtime.threads": "1", **case_overrides(model, kind, stages)}
            out[name] = Run(name, tuple(f"{k}={v}" for k, v in overrides.items()))
        return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Suite:
    root = tmp_path_factory.mktemp("pipeline")
    files: dict[str, Path] = {"smollm2": smollm2_path}
    prompt_ids, recomputed, eog = {}, {}, {}
    eos_text_id = VOCAB.id_of(EOS_TEXT)
    for model, spec in PIPELINE_SPECS.items():
        path = write_pipeline_model(root / f"{model}.gguf", spec, TokenizerChoice(add_bos=ADD_BOS[model]))
        tok = load_tokenizer(path)
        prompt_ids[model] = [tok.encode(p) for p in WAVE_PROMPTS]
        recomputed[model] = greedy_recompute(path, spec.n_layer, prompt_ids[model], MAX_NEW)
        eos = pick_eos(recomputed[model], eos_text_id)
        files[model] = path
        files[f"{model}-eos"] = write_pipeline_model(
            root / f"{model}-eos.gguf", spec, TokenizerChoice(eos_id=eos, add_bos=ADD_BOS[model])
        )
        # By hand: the file's eos id, plus "<|endoftext|>", which llama.cpp always treats as EOG.
        eog[model], eog[f"{model}-eos"] = {eos_text_id}, {eos, eos_text_id}
    return Suite(root, files, prompt_ids, recomputed, eog)


class SingleProcess:
    """S = 1 runs in this process (no process group), each run the first time it is asked for."""

    def __init__(self, runs: dict[str, Run]) -> None:
        self.runs, self._done = runs, set()

    def out(self, name: str) -> Path:
        if name not in self._done:
            run_all([self.runs[name]], DistEnv(rank=0, world=1, local_rank=0, local_world=1))
            self._done.add(name)
        return self.runs[name].out_dir


@pytest.fixture(scope="module")
def single(suite: Suite) -> SingleProcess:
    return SingleProcess(suite.runs(1))


@dataclass(frozen=True)
class Launched:
    stages: int
    runs: dict[str, Run]

    def out(self, name: str) -> Path:
        return self.runs[name].out_dir


@pytest.fixture(scope="module", params=STAGES, ids=lambda s: f"S{s}")
def pipelined(request: pytest.FixtureRequest, suite: Suite) -> Launched:
    """Every configuration on S ranks, in one torchrun launch."""
    stages: int = request.param
    runs = suite.runs(stages)
    runs_file = write_runs(suite.root / f"runs-S{stages}.json", list(runs.values()))
    done = run_command(
        torchrun_command("--standalone", f"--nproc_per_node={stages}", "tests/pipeline_driver.py", str(runs_file)),
        LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, f"driver on {stages} ranks failed:\n{done.tail()}"
    return Launched(stages, runs)


def results(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def tokens_of(out_dir: Path) -> list[list[int]]:
    return [r["token_ids"] for r in results(out_dir)]


def logits_of(out_dir: Path) -> np.ndarray:
    return np.load(out_dir / "logits.npy")


def metrics_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


# ---- the single-process reference against independent ones ---------------------------------


@pytest.mark.parametrize(("model", "kind"), [(m, k) for m, k in CASES if k in GREEDY_KINDS + EOS_KINDS])
def test_single_process_greedy_matches_recompute(suite: Suite, single: SingleProcess, model: str, kind: str) -> None:
    """Lanes, left padding, chunked prefill and the KV cache change nothing: the tokens are
    the recomputed greedy ones, cut at the first end-of-generation id."""
    file_key = f"{model}-eos" if kind in EOS_KINDS else model
    n = len(WAVE_PROMPTS) if kind.startswith("waves") else len(PROMPTS)
    got = results(single.out(f"{model}-{kind}"))
    assert [r["prompt_ids"] for r in got] == suite.prompt_ids[model][:n]
    expected = [truncate_at(c, suite.eog[file_key]) for c in suite.recomputed[model][:n]]
    assert [(r["token_ids"], r["finish_reason"]) for r in got] == expected


@pytest.mark.parametrize("model", TINY)
def test_eos_ends_sequences_at_different_steps(suite: Suite, model: str) -> None:
    """The EOS variant really exercises uneven finishes (a precondition of the parity tests)."""
    ends = [truncate_at(c, suite.eog[f"{model}-eos"]) for c in suite.recomputed[model]]
    assert len({len(kept) for kept, why in ends if why == "stop"}) >= 2, ends
    assert any(why == "length" for _, why in ends), ends


@pytest.mark.parametrize("model", TINY)
def test_single_process_score_matches_one_forward(suite: Suite, single: SingleProcess, model: str) -> None:
    """Chunks of 3 through the cache (sliding window 4 on gemma2) = one full forward."""
    spec = PIPELINE_SPECS[model]
    full = one_forward(whole(suite.files[model], spec.n_layer), SCORE_IDS)
    got = logits_of(single.out(f"{model}-score"))
    assert got.dtype == np.float32 and got.shape == (len(SCORE_IDS), spec.n_vocab)
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model", TINY)
def test_sampling_is_independent_of_lanes(single: SingleProcess, model: str) -> None:
    """Seeded sampling gives each sequence its own stream: 1 or 3 lanes, the same tokens; and
    it is sampling (some sequence differs from greedy)."""
    sampled = tokens_of(single.out(f"{model}-sampled-m3"))
    assert tokens_of(single.out(f"{model}-sampled-m1")) == sampled
    assert sampled != tokens_of(single.out(f"{model}-balanced"))


@pytest.fixture(scope="module")
def smollm2_whole(smollm2_path: Path) -> PipelineStage:
    with one_thread():
        return whole(smollm2_path, 30)


@pytest.mark.slow
def test_smollm2_single_process_is_greedy(
    smollm2_path: Path, smollm2_whole: PipelineStage, single: SingleProcess
) -> None:
    """Teacher forcing, one forward per sequence: each generated token is the argmax after the
    prompt and the tokens before it (what greedy recompute would pick), and a sequence ends on
    its first end-of-generation id or at the budget."""
    tok = load_tokenizer(smollm2_path)
    eog = set(tok.eog_ids)
    got = results(single.out("smollm2-greedy"))
    assert [r["prompt_ids"] for r in got] == [tok.encode(p) for p in DEFAULT_PROMPTS]
    for r in got:
        n, generated = len(r["prompt_ids"]), r["token_ids"]
        logits = one_forward(smollm2_whole, r["prompt_ids"] + generated)  # [T, V]
        assert generated == logits[n - 1: n - 1 + len(generated)].argmax(-1).tolist(), r["prompt"]
        assert not eog & set(generated[:-1])
        if generated[-1] in eog:
            assert r["finish_reason"] == "stop"
        else:
            assert (r["finish_reason"], len(generated)) == ("length", SMOL_NEW)


@pytest.mark.slow
def test_smollm2_score_matches_one_forward(
    smollm2_path: Path, smollm2_whole: PipelineStage, single: SingleProcess
) -> None:
    full = one_forward(smollm2_whole, load_tokenizer(smollm2_path).encode(SMOL_SCORE_TEXT))
    np.testing.assert_allclose(logits_of(single.out("smollm2-score")), full, rtol=0, atol=2e-4)


def test_zero_new_tokens_fails_cleanly_or_generates_nothing(suite: Suite, tmp_path: Path) -> None:
    """`generation.max_new_tokens=0` passes config validation ("must be >= 0"), so a generate
    run must either be rejected up front with an error naming the key (what DESIGN.md asks of
    user mistakes: before any process group, identically on every rank) or generate nothing."""
    run = Run("zero", (f"model.path={suite.files['llama']}", f"output.dir={tmp_path}", "runtime.device=cpu",
                       "runtime.threads=1", f"prompts={hydra_list(PROMPTS)}", "generation.max_new_tokens=0"))
    try:
        run_all([run], DistEnv(rank=0, world=1, local_rank=0, local_world=1))
    except PPInferError as exc:
        assert "generation.max_new_tokens" in str(exc)
        return
    assert [r["token_ids"] for r in results(tmp_path)] == [[] for _ in PROMPTS]


# ---- pipelined runs against the single-process one -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATE_NAMES)
def test_generate_matches_single_process(pipelined: Launched, single: SingleProcess, name: str) -> None:
    assert results(pipelined.out(name)) == results(single.out(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_score_matches_single_process(pipelined: Launched, single: SingleProcess, name: str) -> None:
    np.testing.assert_allclose(logits_of(pipelined.out(name)), logits_of(single.out(name)), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", TINY)
def test_runs_used_the_requested_layout(pipelined: Launched, model: str) -> None:
    """The configurations above really ran as described (allocation, lanes, waves)."""
    s = pipelined.stages
    explicit = metrics_of(pipelined.out(f"{model}-explicit-m5-eos"))
    assert (explicit["stages"], explicit["layers"], explicit["microbatches"]) == (s, EXPLICIT[s], 5)
    assert [p["layers"] for p in explicit["per_stage"]] == [
        [sum(EXPLICIT[s][:i]), sum(EXPLICIT[s][: i + 1])] for i in range(s)
    ]
    assert metrics_of(pipelined.out(f"{model}-uniform-chunk3"))["layers"] == UNIFORM[s]
    waves = metrics_of(pipelined.out(f"{model}-waves-eos"))
    assert (waves["microbatches"], waves["lane_size"], waves["sequences"]) == (2, 2, len(WAVE_PROMPTS))
    assert waves["prefix_cache_hit_rate"] > 0
    balanced = metrics_of(pipelined.out(f"{model}-balanced"))
    assert len(balanced["layers"]) == s and sum(balanced["layers"]) == 6
    assert all(len(p) == s for p in (balanced["per_stage"], explicit["per_stage"]))


# ---- the real entry point ------------------------------------------------------------------


@pytest.mark.slow
def test_default_command_line(tmp_path: Path, single: SingleProcess) -> None:
    """`torchrun --nproc_per_node=4 launch/infer.py` with only the output dir (and a short
    budget): the default model continues the 4 default prompts, printed and in results.jsonl,
    with the single-process greedy tokens of the same (quantized) weights."""
    out = tmp_path / "default"
    done = run_command(
        torchrun_command("--standalone", "--nproc_per_node=4", "launch/infer.py", f"output.dir={out}",
                         f"generation.max_new_tokens={SMOL_NEW}"),
        LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, done.tail()
    got = results(out)
    assert [r["prompt"] for r in got] == list(DEFAULT_PROMPTS)
    assert [r["index"] for r in got] == [0, 1, 2, 3]
    assert [r["token_ids"] for r in got] == tokens_of(single.out("smollm2-quantized"))
    for r in got:
        assert f"--- [{r['index']}] {r['prompt']!r}\n{r['text']}" in done.output
    assert any(r["text"].strip() for r in got)
    assert metrics_of(out)["stages"] == 4


@pytest.mark.slow
def test_two_nodes_on_loopback(suite: Suite, single: SingleProcess, tmp_path: Path) -> None:
    """Two torchrun agents meeting at a c10d rendezvous on 127.0.0.1, 2 ranks each, run
    `launch/infer.py` as one 4-stage pipeline and get the single-process tokens."""
    name = "llama-explicit-m5-eos"
    out = tmp_path / "two-nodes"
    overrides = [o for o in suite.runs(4)[name].overrides if not o.startswith("output.dir=")] + [f"output.dir={out}"]
    port = free_port()
    agents = [
        start_command(torchrun_command(
            "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=ppinfer-two-nodes", f"--rdzv-conf=is_host={int(node == 0)}", "--local-addr=127.0.0.1",
            "launch/infer.py", *overrides,
        ), extra_env={"LOGLEVEL": "INFO"})  # each agent then logs the global ranks it started
        for node in range(2)
    ]
    done: list[Finished] = [wait_command(a, LAUNCH_TIMEOUT_S) for a in agents]
    for node, d in enumerate(done):
        assert d.returncode == 0, f"node {node}:\n{d.tail()}"
    # Rank 0 logs the plan and the summary under the agent of ranks 0 and 1; the other agent
    # started ranks 2 and 3.
    first = [i for i, d in enumerate(done) if all(f"[ppinfer rank 0] {w}" in d.output for w in ("model", "done"))]
    last = [i for i, d in enumerate(done) if "global_ranks=[2, 3]" in d.output]
    assert len(first) == len(last) == 1 and first != last, [d.tail() for d in done]
    assert "global_ranks=[0, 1]" in done[first[0]].output
    assert metrics_of(out)["stages"] == 4
    assert results(out) == results(single.out(name))

