"""Error types for mistakes a user can make.

Every user-reachable failure raises one of these with a message that names the bad value.
The launcher catches `PPInferError` on the rank that detected it, prints the message once and
exits non-zero on every rank; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PPInferError(Exception):
    """Base class: a problem with the user's input, not a bug in ppinfer."""


class ConfigError(PPInferError, ValueError):
    """A configuration value is invalid (names the key and the value)."""


class ModelFileError(PPInferError, ValueError):
    """A GGUF file is missing, malformed or unsupported (names the file and the tensor/key)."""


class PromptError(PPInferError, ValueError):
    """A prompt, prompts file or token id list is unusable (names the prompt or line)."""
