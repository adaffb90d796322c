"""What the HTTP layer needs from the pipeline (`Engine`): tokenize a request's prompt, submit
it with its generation settings, receive its tokens as events, cancel it, read the state.

`ppinfer.serving.pipeline_engine.PipelineEngine` implements it over the pipeline's intake;
tests of the HTTP layer may use any object with the same methods. Events are delivered by
calling the `emit` given to `submit` from the pipeline's own thread, in order, ending with
exactly one `Finished` (`ppinfer.pipeline.sequence`).
"""

from __future__ import annotations

from typing import Any, Protocol

from ppinfer.pipeline.intake import IntakeStats
from ppinfer.pipeline.sequence import Emit
from ppinfer.sampling.params import GenerationParams
from ppinfer.text.tools import ToolSyntax


class PromptTooLong(ValueError):
    """The prompt cannot fit the context, found before it is tokenized (HTTP 400)."""


class Engine(Protocol):
    model_id: str
    context_length: int
    """Tokens one sequence may hold: prompt plus generated."""
    defaults: GenerationParams
    """The server's `generation.*` config: what a request does not set."""
    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    tool_syntax: ToolSyntax
    """How the chat template writes tool calls (`ppinfer.text.tools.tool_syntax`)."""

    def ready(self) -> bool:
        """True once every stage is loaded and the pipeline loop runs."""

    def failure(self) -> str | None:
        """Why the engine stopped for good (a rank died), or None."""

    def stall(self) -> str | None:
        """Why the engine looks stuck (work in flight, no progress for a while), or None."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain completion prompt (BOS as the file says); PromptTooLong when
        it cannot fit the context, ValueError when it cannot be tokenized."""

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a chat (and its tools, OpenAI's function definitions) rendered with the
        model's template in `tool_syntax`; PromptTooLong, or ValueError on bad messages."""

    def control_token(self, text: str) -> int | None:
        """The id of the control token spelled `text`, or None."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (special tokens spelled out), for log-probabilities."""

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (an echoed prompt given as ids)."""

    def submit(self, prompt_ids: list[int], params: GenerationParams, emit: Emit, choice: int = 0,
               render_special: bool = False) -> int:
        """Queue a sequence; returns its id. `choice`: which of a request's choices for this
        prompt it is (each has its own random stream from the request's seed);
        `render_special`: its text keeps control tokens (tool-call markers). Raises
        ValueError (prompt plus max_new_tokens beyond `context_length`, empty prompt),
        QueueFull or Unavailable (`ppinfer.pipeline.intake`)."""

    def cancel(self, request_id: int) -> None:
        """Stop a request (its client went away); its row is freed at the next step and it
        ends with Finished(reason="cancelled"). Unknown or finished ids are ignored."""

    def stats(self) -> IntakeStats:
        """Queue length, running sequences, per-stage busy time."""
