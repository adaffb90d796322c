"""ppinfer: pipeline-parallel inference of GGUF models over torch.distributed."""

from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
