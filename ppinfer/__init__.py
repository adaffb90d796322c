"""ppinfer: pipeline-parallel inference of GGUF models over torch.distributed."""
