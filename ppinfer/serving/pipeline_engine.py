"""The `Engine` of the server, on the pipeline's first rank: a request's prompt is tokenized
in the HTTP layer's worker thread and becomes a `Sequence` submitted to the pipeline's intake;
queueing, cancellation and keeping the ring alive are the pipeline's (`Intake`)."""

from __future__ import annotations

import itertools
import secrets
import threading
from typing import Any

from ppinfer.pipeline.intake import Intake, IntakeStats
from ppinfer.pipeline.job import encode_prompt
from ppinfer.pipeline.sequence import Emit, Sequence
from ppinfer.sampling.params import GenerationParams
from ppinfer.sampling.sampler import stream_seed
from ppinfer.sampling.stopping import StopState
from ppinfer.serving.engine import PromptTooLong
from ppinfer.text.tokenizer import Tokenizer
from ppinfer.text.tools import tool_syntax


class PipelineEngine:
    def __init__(
        self,
        model_id: str,
        tokenizer: Tokenizer,
        context_length: int,
        defaults: GenerationParams,
        intake: Intake,
        chat_template: str | None = None,
    ) -> None:
        self.model_id, self.tokenizer, self.context_length = model_id, tokenizer, context_length
        self.defaults, self.intake, self.chat_template = defaults, intake, chat_template
        self.vocab_size = tokenizer.vocab_size
        self.tool_syntax = tool_syntax(chat_template if chat_template is not None else tokenizer.chat_template)
        self._eog = frozenset(tokenizer.eog_ids)
        self._ids = itertools.count()
        self._id_lock = threading.Lock()

    def ready(self) -> bool:
        return self.intake.ready()

    def failure(self) -> str | None:
        return self.intake.failure()

    def stall(self) -> str | None:
        return self.intake.stall()

    def stats(self) -> IntakeStats:
        return self.intake.stats()

    def encode_prompt(self, text: str) -> list[int]:
        self._check_fits(text)
        return encode_prompt(self.tokenizer, text, chat=False)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        self._check_fits("".join(m["content"] for m in messages))
        syntax = self.tool_syntax
        text = self.tokenizer.apply_chat_template(
            syntax.conversation(messages, tools), template=self.chat_template, tools=tools if syntax.native else None)
        return encode_prompt(self.tokenizer, text, chat=True)

    def control_token(self, text: str) -> int | None:
        return self.tokenizer.control_token(text)

    def _check_fits(self, text: str) -> None:
        """Refuse, before tokenizing it, text too long for the context whatever its tokens:
        no token covers more bytes of text than the longest vocabulary entry holds."""
        size = len(text.encode("utf-8", "surrogatepass"))
        fewest = -(-size // self.tokenizer.max_token_bytes)
        if fewest >= self.context_length:
            raise PromptTooLong(
                f"the prompt's {size} bytes make at least {fewest} tokens; the context length is "
                f"{self.context_length}"
            )

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def submit(self, prompt_ids: list[int], params: GenerationParams, emit: Emit, choice: int = 0,
               render_special: bool = False) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"{len(prompt_ids)} prompt tokens + max_tokens={params.max_new_tokens} exceed the "
                f"context length of {self.context_length}"
            )
        with self._id_lock:
            seq = next(self._ids)
        seed = stream_seed(params.seed, choice) if params.seed is not None else secrets.randbits(63)
        output = StopState(params.stop_conditions(self._eog), self.tokenizer.stream(skip_special=not render_special))
        self.intake.submit(Sequence(seq, list(prompt_ids), params, seed, output=output, emit=emit))
        return seq

    def cancel(self, request_id: int) -> None:
        self.intake.cancel(request_id)
