"""The batch command (`launch/infer.py`): the job's prompts are the first rank's sequences,
all queued before the loop; each finished one is a line of results.jsonl, in prompt order, and
its text on stdout."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import Any

from ppinfer.pipeline.intake import Intake
from ppinfer.pipeline.job import Job
from ppinfer.pipeline.outputs import ResultsWriter
from ppinfer.pipeline.rank import run_rank
from ppinfer.pipeline.sequence import Event, Finished, Sequence
from ppinfer.sampling.logprobs import TokenLogprob
from ppinfer.sampling.stopping import StopState


def run(cfg: Any, environ: Mapping[str, str] = os.environ, overrides: Seq[str] = ()) -> int:
    """The whole rank of the batch command; returns the process exit code."""
    return run_rank(cfg, environ, overrides, BatchFront())


class BatchFront:
    serve = False

    def check(self, job: Job) -> None:
        """Nothing beyond the job's own checks."""

    def open(self, job: Job, intake: Intake) -> None:
        """The first rank queues every prompt and closes the intake."""
        if not job.plan.is_first:
            return
        writes = job.env.rank == job.writer_rank and not job.is_score
        writer = ResultsWriter(job.out_dir) if writes else None
        for sequence in batch_sequences(job):
            if writer is not None:
                sequence.emit = _result_line(sequence, writer)
            intake.submit(sequence)
        intake.close()

    def failed(self, why: str) -> None:
        """The finished sequences' lines are written already."""

    def close(self) -> None:
        """Nothing to release."""


def batch_sequences(job: Job) -> list[Sequence]:
    """The job's prompts as sequences, in prompt order (scored ones for `task=score`)."""
    eog = frozenset(job.tokenizer.eog_ids)
    sequences = []
    for i, (text, ids, params, seed) in enumerate(zip(job.texts, job.prompts, job.params, job.stream_seeds)):
        output = None
        if not job.is_score:
            output = StopState(params.stop_conditions(eog), job.tokenizer.stream(skip_special=True))
        sequences.append(Sequence(i, ids, params, seed, output=output, scored=job.is_score, text=text))
    return sequences


def _result_line(sequence: Sequence, writer: ResultsWriter) -> Any:
    """The sequence's `emit`: at its end, its results.jsonl line (written in prompt order)
    and its text on stdout."""

    def emit(event: Event) -> None:
        if not isinstance(event, Finished) or event.reason not in ("stop", "length"):
            return  # only completed sequences have a line (a failed run keeps those)
        output = sequence.output
        assert output is not None
        record: dict[str, Any] = {
            "index": sequence.id,
            "prompt": sequence.text,
            "prompt_ids": list(sequence.prompt),
            "token_ids": output.token_ids,
            "text": output.text,
            "finish_reason": output.finish_reason,
        }
        if sequence.params.logprobs is not None:  # one entry per token id
            record["logprobs"] = [_entry(e) for e in sequence.logprobs]
        if sequence.params.prompt_logprobs is not None:  # one per prompt id, null for the first
            record["prompt_logprobs"] = [_entry(e) for e in sequence.prompt_logprobs or ()]
        for rec in writer.add(sequence.id, record):
            # the run's product, on stdout (logs go to stderr)
            sys.stdout.write(f"--- [{rec['index']}] {rec['prompt']!r}\n{rec['text']}\n")
            sys.stdout.flush()

    return emit


def _entry(entry: TokenLogprob | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"token": entry.token, "logprob": entry.logprob, "top": [list(pair) for pair in entry.top]}
