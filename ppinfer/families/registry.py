"""The ten supported families, one explicit `FamilySpec` each, looked up by architecture."""

from __future__ import annotations

from dataclasses import replace

from ppinfer.errors import ModelFileError
from ppinfer.families.spec import FamilySpec, Mlp, Norm, Rope, SlidingWindow, Tying

LLAMA = FamilySpec(
    arch="llama",
    norm=Norm.RMS,
    rope=Rope.NORM,  # llama.cpp's converter permutes q/k rows for ggml's NORM rope
    mlp=Mlp.SWIGLU,
    fused_gate_up=False,
    parallel_block=False,
    qk_norm=False,
    post_norms=False,
    embed_scale=False,
    tying=Tying.OPTIONAL,
    output_bias=False,
    sliding=None,  # llama.cpp ignores Mistral 7B's sliding window too
    attn_softcap_default=None,
    final_softcap_key=False,
    final_softcap_default=None,
)

MISTRAL3 = replace(LLAMA, arch="mistral3")

QWEN2 = replace(LLAMA, arch="qwen2", rope=Rope.NEOX)

QWEN3 = replace(QWEN2, arch="qwen3", qk_norm=True)

PHI2 = replace(
    LLAMA,
    arch="phi2",
    norm=Norm.LAYER,
    rope=Rope.NEOX,
    mlp=Mlp.GELU,
    parallel_block=True,
    tying=Tying.NEVER,
    output_bias=True,
)

PHI3 = replace(LLAMA, arch="phi3", rope=Rope.NEOX, fused_gate_up=True)

STARCODER2 = replace(LLAMA, arch="starcoder2", norm=Norm.LAYER, rope=Rope.NEOX, mlp=Mlp.GELU)

GEMMA = replace(
    LLAMA,
    arch="gemma",
    rope=Rope.NEOX,
    mlp=Mlp.GEGLU,
    embed_scale=True,
    tying=Tying.ALWAYS,
)

GEMMA2 = replace(
    GEMMA,
    arch="gemma2",
    post_norms=True,
    tying=Tying.OPTIONAL,
    sliding=SlidingWindow(
        default_window=4096, default_pattern=2, default_rope_base=None, rope_scaling=True
    ),
    attn_softcap_default=50.0,
    final_softcap_key=True,
    final_softcap_default=30.0,
)

GEMMA3 = replace(
    GEMMA2,
    arch="gemma3",
    qk_norm=True,
    sliding=SlidingWindow(
        default_window=0, default_pattern=6, default_rope_base=10000.0, rope_scaling=False
    ),
    attn_softcap_default=None,
    final_softcap_default=None,
)

FAMILIES: dict[str, FamilySpec] = {
    spec.arch: spec
    for spec in (LLAMA, MISTRAL3, QWEN2, QWEN3, PHI2, PHI3, STARCODER2, GEMMA, GEMMA2, GEMMA3)
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


def get_spec(arch: str, source: str = "") -> FamilySpec:
    """The spec for `general.architecture` = `arch`; unknown ones list what is supported."""
    if arch not in FAMILIES:
        where = f"{source}: " if source else ""
        raise ModelFileError(
            f"{where}unsupported architecture {arch!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    return FAMILIES[arch]
