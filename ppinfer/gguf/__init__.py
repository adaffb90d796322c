"""GGUF files: metadata, tensor index and per-tensor dequantization (no knowledge of ranks)."""

from ppinfer.gguf.reader import SUPPORTED_TENSOR_TYPES, GGUFFile, TensorInfo, dequantize

__all__ = ["SUPPORTED_TENSOR_TYPES", "GGUFFile", "TensorInfo", "dequantize"]
