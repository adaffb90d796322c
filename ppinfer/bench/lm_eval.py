"""`python -m ppinfer.bench.lm_eval`: lm-evaluation-harness (`pip install -e .[eval]`) against
`launch/serve.py`, as users run it: the `local-completions` model on two local JSONL tasks, a
multiple-choice one (log-likelihoods: echoed prompt log-probabilities) and a `generate_until`
one. Then every multiple-choice request's log-likelihood is checked against the batch
command's `task=score` on the same token ids (one stage, in this process).

The harness needs a Hugging Face tokenizer to send token ids: the GGUF file's own, converted by
transformers (`AutoTokenizer.from_pretrained(..., gguf_file=...)`) into a temporary folder.
Nothing is downloaded (datasets are read from the JSONL files written here).

    python -m ppinfer.bench.lm_eval [--nproc 2] [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppinfer.bench.server import running_server

MULTIPLE_CHOICE = [
    ("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Which animal says moo?", ["A dog", "A cow", "A cat", "A duck"], 1),
    ("How many legs does a spider have?", ["Six", "Four", "Eight", "Ten"], 2),
    ("What colour is the sky on a clear day?", ["Green", "Red", "Yellow", "Blue"], 3),
    ("What do bees make?", ["Honey", "Milk", "Silk", "Wool"], 0),
]
GENERATE = [
    ("What is the capital of France?", "Paris"),
    ("What is 2 plus 2?", "4"),
    ("What is the opposite of hot?", "Cold"),
    ("What colour is grass?", "Green"),
]
TOLERANCE = 1e-4
"""Largest difference allowed between the server's and task=score's log-likelihoods (on the
exact path, `runtime.weights=dequantized`)."""


def _tasks(root: Path) -> None:
    """The two tasks' JSONL data and YAML configs under `root` (the harness's include path)."""
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                           for q, c, a in MULTIPLE_CHOICE))
    (root / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GENERATE))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "ppinfer_mc.yaml").write_text(
        f"task: ppinfer_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    (root / "ppinfer_gen.yaml").write_text(
        f"task: ppinfer_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")


def _hf_tokenizer(model: Path, out: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def _scored(model: Path, ids: list[int], out: Path) -> np.ndarray:
    """log-softmax [T, V] of task=score on `ids` (one stage, exact weights)."""
    from hydra import compose, initialize_config_dir

    from ppinfer.bench.sweep import repo_root
    from ppinfer.config import register_configs
    from ppinfer.pipeline.batch import run

    register_configs()
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"model.path={model}", "task=score", f"input.token_ids=[{','.join(map(str, ids))}]",
            "runtime.weights=dequantized", f"output.dir={out}"])
    if run(cfg, environ={}) != 0:
        raise RuntimeError(f"task=score failed on {len(ids)} ids")
    return torch.log_softmax(torch.from_numpy(np.load(out / "logits.npy")).double(), dim=-1).numpy()


def run(model: Path, nproc: int, port: int, overrides: Sequence[str]) -> dict[str, Any]:
    import lm_eval

    root = Path(tempfile.mkdtemp(prefix="ppinfer-lm-eval-"))
    _tasks(root)
    tokenizer = _hf_tokenizer(model, root / "tokenizer")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    server = [f"model.path={model}", "runtime.weights=dequantized", f"output.dir={root / 'server'}", *overrides]
    with running_server(server, port, nproc, log=root / "server.log") as (url, model_id):
        args = (f"model={model_id},base_url={url}/v1/completions,tokenizer={root / 'tokenizer'},"
                "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1,tokenized_requests=True")
        results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                          tasks=["ppinfer_mc", "ppinfer_gen"], log_samples=True,
                                          task_manager=lm_eval.tasks.TaskManager(include_path=str(root)))
    differences = []
    for sample in results["samples"]["ppinfer_mc"]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            server_ll = response[0][0]
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            ctxlen = len(tokenizer(context, add_special_tokens=False).input_ids)
            logprobs = _scored(model, whole, root / "score")
            reference = sum(logprobs[p - 1, whole[p]] for p in range(ctxlen, len(whole)))
            differences.append(abs(server_ll - reference))
    return {"results": {t: results["results"][t] for t in ("ppinfer_mc", "ppinfer_gen")},
            "loglikelihoods_checked": len(differences), "max_difference": max(differences), "dir": str(root)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppinfer.bench.lm_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled default model)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for launch/serve.py")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from ppinfer.hub.fetch import ensure_model

        model = ensure_model("smollm2-135m-instruct")
    report = run(model, args.nproc, args.port, args.overrides)
    print(json.dumps(report, indent=2, default=str))
    ok = report["max_difference"] <= TOLERANCE
    print(f"{report['loglikelihoods_checked']} multiple-choice log-likelihoods, largest difference from task=score "
          f"{report['max_difference']:.2e} ({'within' if ok else 'beyond'} {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
