"""Typed hyper-parameters read from a GGUF header, with llama.cpp's defaults per family."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ppinfer.errors import ModelFileError
from ppinfer.families.registry import get_spec
from ppinfer.families.spec import AttnKind, ExpertWidth, FamilySpec, Gating, Norm, SharedExpert
from ppinfer.gguf.reader import GGUFFile


@dataclass(frozen=True)
class YarnParams:
    """YaRN's blend of interpolated and extrapolated frequencies (llama.cpp's `rope_yarn`):
    pairs below the correction range keep their original frequency, pairs above it are
    scaled by freq_scale, with a linear ramp in between."""

    orig_ctx: int  # rope.scaling.original_context_length (the pre-training context)
    ext_factor: float  # weight of the extrapolated frequencies (1: the full ramp)
    beta_fast: float  # rotations at which the ramp starts
    beta_slow: float  # rotations at which it ends


@dataclass(frozen=True)
class RopeParams:
    """One rotary embedding: theta_i = pos * freq_scale * base^(-2i/n_rot) / factors_i, blended
    with the unscaled frequency by YaRN when `yarn` is set; cos and sin are multiplied by
    `mscale` (the file's rope.scaling.attn_factor, times YaRN's own attention factor)."""

    n_rot: int  # rotated dims per head (the rest pass through)
    base: float
    freq_scale: float  # 1 / scaling factor
    factors: str | None  # the global tensor of per-frequency divisors: `rope_freqs.weight`, or
    # phi3 longrope's `rope_factors_long.weight` / `rope_factors_short.weight`; None: none
    yarn: YarnParams | None = None
    mscale: float = 1.0


@dataclass(frozen=True)
class MoeParams:
    """A layer's Mixture-of-Experts feed-forward: `n_expert_used` of `n_expert` experts of
    width `n_ff_exp` per token, plus a shared expert of width `n_ff_shexp` (0: none)."""

    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    gating: Gating
    normalize: bool  # chosen experts' weights divided by their sum
    weights_scale: float = 1.0  # multiplies the chosen experts' weights (after normalisation)
    n_group: int = 1  # experts in n_group equal groups; only the best n_group_used groups are
    n_group_used: int = 1  # eligible (a group scores the sum of its two best selection scores)


@dataclass(frozen=True)
class LatentParams:
    """Multi-head latent attention: queries through a rank-`q_lora_rank` bottleneck (0: one
    projection), keys and values decompressed from a rank-`kv_lora_rank` latent; the last
    `n_rot` of each query and key head's dims rotate."""

    q_lora_rank: int
    kv_lora_rank: int


@dataclass(frozen=True)
class LayerParams:
    """Per-layer shape and attention kind."""

    n_head: int
    n_head_kv: int
    n_ff: int
    sliding_window: int  # 0 = global attention
    rope: RopeParams | None  # None: no rotary embedding (llama4's NoPE layers)
    moe: MoeParams | None  # None: a dense feed-forward of width n_ff
    qk_l2_norm: bool = False  # q and k heads RMS-normalised without weight after rope (llama4)
    attn_chunk: int = 0  # > 0: queries attend only to keys in their chunk of this many positions (llama4)


@dataclass(frozen=True)
class HParams:
    """Everything about the model's shape that the forward pass needs."""

    arch: str
    n_layer: int  # decoder layers
    n_block: int  # block_count: blk.N tensors exist for N < n_block (n_layer plus skipped ones)
    n_embd: int
    n_ctx: int
    n_vocab: int
    head_dim: int  # key_length (latent attention: key_length_mla when present)
    head_dim_v: int  # value_length (latent attention: value_length_mla when present)
    norm_eps: float
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    layers: tuple[LayerParams, ...]
    latent: LatentParams | None = None  # multi-head latent attention's ranks (deepseek2)
    embed_scale: float | None = None  # multiplies the embeddings (gemma: sqrt(E); granite: embedding_scale)
    residual_scale: float = 1.0  # multiplies each branch before its residual add (granite)
    logit_scale: float = 1.0  # divides the logits (granite)


def per_layer_values(value: Any, n_layer: int, key: str, path: str) -> list[int]:
    """GGUF stores some counts either as one scalar or as a per-layer array."""
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        values = [int(v) for v in value]
        if len(values) != n_layer:
            raise ModelFileError(f"{path}: {key} has {len(values)} entries for {n_layer} layers")
        return values
    return [int(value)] * n_layer


def _check_head_dim(gf: GGUFFile, head_dim: int, n_head: int, n_head_kv: int, name: str) -> None:
    """The head size must match layer 0's query projection (checked before anything is sized
    by it: a corrupt value would otherwise size rotary tables and caches)."""
    q, qkv = gf.tensors.get("blk.0.attn_q.weight"), gf.tensors.get("blk.0.attn_qkv.weight")
    if q is not None:
        expected, tensor = n_head * head_dim, q
    elif qkv is not None:
        expected, tensor = (n_head + 2 * n_head_kv) * head_dim, qkv
    else:
        return
    if head_dim < 1 or tensor.shape[0] != expected:
        raise ModelFileError(
            f"{gf.path}: {name}={head_dim} does not match tensor {tensor.name!r} of shape {list(tensor.shape)} "
            f"({n_head} heads)"
        )


ROPE_SCALINGS = ("none", "linear", "yarn")


def _rope_factors(gf: GGUFFile) -> str | None:
    """The rotary frequency divisors llama.cpp uses: `rope_freqs` when present; else phi3
    longrope's long factors when the context a sequence may reach (the file's context_length,
    ppinfer's per-sequence limit) exceeds the original context, its short factors otherwise.
    llama.cpp decides this once per context (n_ctx per sequence against
    rope.scaling.original_context_length); transformers decides per forward, by the longest
    position in it."""
    if "rope_freqs.weight" in gf.tensors:
        return "rope_freqs.weight"
    long, short = "rope_factors_long.weight", "rope_factors_short.weight"
    if long not in gf.tensors and short not in gf.tensors:
        return None
    arch = gf.architecture
    n_ctx = int(gf.require(f"{arch}.context_length"))
    n_ctx_orig = int(gf.get(f"{arch}.rope.scaling.original_context_length", n_ctx))
    chosen = long if n_ctx > n_ctx_orig else short
    if chosen not in gf.tensors:
        raise ModelFileError(f"{gf.path}: tensor {chosen!r} is missing (the file has the other longrope factors)")
    return chosen


def _read_rope(gf: GGUFFile, n_rot: int, base: float, factors: str | None, latent: bool) -> tuple[RopeParams, float]:
    """The rotary embedding of global-attention layers, with the file's rope scaling (llama.cpp's
    keys and defaults: YaRN's ramp from the original context with betas 32 and 1, and its
    attention factor `yarn_attn_factor * attn_factor * (1 + 0.1 ln(factor))`), and the factor
    on the attention scores' scale (1 but for latent attention under YaRN, where the rotation
    keeps `attn_factor` alone and the scores are scaled by m^2 with
    m = attn_factor * (1 + yarn_log_multiplier ln(factor)), as llama.cpp's deepseek2 does)."""
    arch, path = gf.architecture, gf.path

    def key(name: str) -> str:
        return f"{arch}.rope.scaling.{name}"

    scaling = str(gf.get(key("type"), "linear"))
    factor = float(gf.get(key("factor"), 0.0) or 0.0)
    if scaling not in ROPE_SCALINGS and factor not in (0.0, 1.0):
        raise ModelFileError(
            f"{path}: rope scaling type {scaling!r} is unsupported (supported: {', '.join(ROPE_SCALINGS)})"
        )
    if factor < 0 or not math.isfinite(factor):
        raise ModelFileError(f"{path}: {key('factor')}={factor} must be a positive number")
    freq_scale = 1.0 / factor if scaling in ("linear", "yarn") and factor > 0 else 1.0
    attn_factor = float(gf.get(key("attn_factor"), 1.0))
    if scaling != "yarn":  # llama.cpp scales every rotation by attn_factor (phi3 longrope's factor)
        return RopeParams(n_rot, base, freq_scale, factors, mscale=attn_factor), 1.0
    yarn = YarnParams(
        orig_ctx=int(gf.get(key("original_context_length"), gf.require(f"{arch}.context_length"))),
        ext_factor=float(gf.get(key("yarn_ext_factor"), 1.0)),
        beta_fast=float(gf.get(key("yarn_beta_fast"), 32.0)),
        beta_slow=float(gf.get(key("yarn_beta_slow"), 1.0)),
    )
    mscale = float(gf.get(key("yarn_attn_factor"), 1.0)) * attn_factor
    if latent:
        score_m = mscale * (1.0 + float(gf.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0)) * math.log(factor))
        return RopeParams(n_rot, base, freq_scale, factors, yarn, mscale), score_m * score_m
    if yarn.ext_factor != 0.0:
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    return RopeParams(n_rot, base, freq_scale, factors, yarn, mscale), 1.0


def _check_expert_tensors(gf: GGUFFile, moe: MoeParams, moe_layers: list[int], n_embd: int) -> None:
    """Every MoE layer's expert tensors must hold expert_count experts of the expert width the
    metadata gives (checked from the tensor index alone, identically on every rank)."""
    arch, f = gf.architecture, moe.n_ff_exp
    for il in moe_layers:
        for role, shape in (("gate", (moe.n_expert, f, n_embd)), ("up", (moe.n_expert, f, n_embd)),
                            ("down", (moe.n_expert, n_embd, f))):
            info = gf.tensors.get(f"blk.{il}.ffn_{role}_exps.weight")
            if info is None or info.shape == shape:
                continue
            if len(info.shape) == 3 and info.shape[0] != moe.n_expert:
                raise ModelFileError(
                    f"{gf.path}: tensor {info.name!r} holds {info.shape[0]} experts (shape {list(info.shape)}) "
                    f"but {arch}.expert_count={moe.n_expert}"
                )
            raise ModelFileError(
                f"{gf.path}: tensor {info.name!r} has shape {list(info.shape)}, expected {list(shape)} "
                f"(experts of width {f}: {arch}.expert_feed_forward_length or its default)"
            )


def _read_moe(gf: GGUFFile, spec: FamilySpec, n_ff: int) -> MoeParams | None:
    """The expert layout from `{arch}.expert_*` keys, or None for a dense model."""
    experts = spec.experts
    if experts is None:
        return None
    arch, path = gf.architecture, gf.path

    def count(name: str, default: int | None = None) -> int:
        key = f"{arch}.{name}"
        value = gf.require(key) if default is None else gf.get(key, default)
        if type(value) is not int or value < 0:
            raise ModelFileError(f"{path}: metadata {key!r} holds {value!r}, expected a count")
        return value

    n_expert = count("expert_count", None if experts.required else 0)
    gating, normalize, scale, n_group, n_group_used = experts.gating, experts.normalize, 1.0, 1, 1
    if experts.routing_keys:
        gating = _GATING_FUNCS.get(count("expert_gating_func", 0), experts.gating)
        normalize = bool(gf.get(f"{arch}.expert_weights_norm", experts.normalize))
        scale = float(gf.get(f"{arch}.expert_weights_scale", 0.0) or 1.0)
        n_group, n_group_used = count("expert_group_count", 1) or 1, count("expert_group_used_count", 1) or 1
        if not math.isfinite(scale) or n_expert % n_group or not 0 < n_group_used <= n_group:
            raise ModelFileError(
                f"{path}: {arch}.expert_weights_scale={scale}, expert_group_count={n_group}, "
                f"expert_group_used_count={n_group_used} do not fit {arch}.expert_count={n_expert}"
            )
    if n_expert == 0:
        if experts.required:
            raise ModelFileError(f"{path}: {arch}.expert_count=0, but {arch} is a Mixture of Experts")
        return None
    n_used = count("expert_used_count")
    if not 0 < n_used <= n_expert:
        raise ModelFileError(
            f"{path}: {arch}.expert_used_count={n_used} must be between 1 and {arch}.expert_count={n_expert}"
        )
    default_width = n_ff if experts.width_default is ExpertWidth.FF else n_ff // n_used
    n_ff_exp = count("expert_feed_forward_length", default_width)
    n_ff_shexp = 0
    if experts.shared is SharedExpert.GATED:
        n_ff_shexp = count("expert_shared_feed_forward_length", n_ff)
    elif experts.shared is SharedExpert.PLAIN:
        n_ff_shexp = n_ff_exp * count("expert_shared_count")
    elif experts.shared is SharedExpert.ONE:
        n_ff_shexp = n_ff_exp
    elif experts.shared is SharedExpert.SIZED:
        n_ff_shexp = count("expert_shared_feed_forward_length", 0)
    optional = experts.shared in (SharedExpert.NONE, SharedExpert.SIZED)
    if n_ff_exp < 1 or (not optional and n_ff_shexp < 1):
        raise ModelFileError(f"{path}: expert width {n_ff_exp} / shared width {n_ff_shexp} must be positive")
    return MoeParams(n_expert, n_used, n_ff_exp, n_ff_shexp, gating, normalize, scale, n_group, n_group_used)


_GATING_FUNCS = {1: Gating.SOFTMAX, 2: Gating.SIGMOID}
"""llama.cpp's `expert_gating_func` values (0: the family's default)."""


def decoder_layers(gf: GGUFFile, spec: FamilySpec) -> tuple[int, int]:
    """(layers of the decoder, block_count): block_count less the trailing next-token
    prediction blocks the family skips (glm4moe's `nextn_predict_layers`)."""
    arch, path = gf.architecture, gf.path
    n_block = gf.require(f"{arch}.block_count")
    n_nextn = gf.get(f"{arch}.nextn_predict_layers", 0) if spec.nextn_layers else 0
    if type(n_block) is not int or type(n_nextn) is not int or not 0 <= n_nextn < n_block:
        raise ModelFileError(
            f"{path}: {arch}.block_count={n_block!r} with nextn_predict_layers={n_nextn!r} leaves no decoder layer"
        )
    return n_block - n_nextn, n_block


def _rope_switch(gf: GGUFFile, name: str) -> bool:
    """Whether the layers rope, from a family's on/off key (absent: on), which llama.cpp reads as a
    boolean and refuses otherwise."""
    value = gf.get(name, True)
    if type(value) is not bool:
        raise ModelFileError(f"{gf.path}: {name}={value!r} must be a boolean")
    return value


def read_hparams(gf: GGUFFile, spec: FamilySpec | None = None) -> HParams:
    """Read and check the header of `gf` (spec looked up from general.architecture if None)."""
    arch = gf.architecture
    spec = spec or get_spec(arch, str(gf.path))
    path = str(gf.path)

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_layer, n_block = decoder_layers(gf, spec)
    # Every layer has tensors: a larger count is a corrupt header; fail before building
    # per-layer tables for it.
    if not 1 <= n_block <= len(gf.tensors):
        raise ModelFileError(f"{path}: {key('block_count')}={n_block} but the file holds {len(gf.tensors)} tensors")
    n_embd = int(gf.require(key("embedding_length")))
    n_head = per_layer_values(gf.require(key("attention.head_count")), n_block, key("attention.head_count"), path)
    n_head_kv = per_layer_values(
        gf.get(key("attention.head_count_kv"), n_head), n_block, key("attention.head_count_kv"), path
    )
    n_ff = per_layer_values(gf.require(key("feed_forward_length")), n_block, key("feed_forward_length"), path)
    if n_layer < 1 or n_embd < 1 or min(n_head) < 1 or min(n_head_kv) < 1:
        raise ModelFileError(f"{path}: nonsensical shape (layers {n_layer}, embd {n_embd}, heads {n_head})")
    for h, hkv in zip(n_head, n_head_kv):
        if h % hkv:
            raise ModelFileError(f"{path}: head_count {h} is not a multiple of head_count_kv {hkv}")
    latent = None
    if spec.attention is AttnKind.LATENT:
        # Files that split attn_kv_b into attn_k_b / attn_v_b describe the latent as one
        # shared head (key_length = kv_lora_rank + n_rot) and give the per-head sizes as *_mla.
        head_dim = int(gf.get(key("attention.key_length_mla"), gf.require(key("attention.key_length"))))
        head_dim_v = int(gf.get(key("attention.value_length_mla"), gf.require(key("attention.value_length"))))
        latent = LatentParams(
            q_lora_rank=int(gf.get(key("attention.q_lora_rank"), 0)),
            kv_lora_rank=int(gf.require(key("attention.kv_lora_rank"))),
        )
        if min(head_dim, head_dim_v, latent.kv_lora_rank) < 1 or latent.q_lora_rank < 0:
            raise ModelFileError(f"{path}: latent attention sizes {head_dim}, {head_dim_v}, {latent} must be positive")
        n_head_kv = list(n_head)  # keys and values are decompressed per query head
    else:
        head_dim = int(gf.get(key("attention.key_length"), n_embd // n_head[0]))
        _check_head_dim(gf, head_dim, n_head[0], n_head_kv[0], key("attention.key_length"))
        head_dim_v = int(gf.get(key("attention.value_length"), head_dim))
        if head_dim_v != head_dim:
            raise ModelFileError(f"{path}: key_length {head_dim} != value_length {head_dim_v} is unsupported")
    n_rot = int(gf.get(key("rope.dimension_count"), head_dim))
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ModelFileError(f"{path}: {key('rope.dimension_count')}={n_rot} must be even and <= {head_dim}")

    base = float(gf.get(key("rope.freq_base"), 10000.0))
    factors = _rope_factors(gf)
    global_rope, score_factor = _read_rope(gf, n_rot, base, factors, latent is not None)

    window, pattern, local_rope = 0, 1, global_rope
    if spec.sliding is not None:
        window = int(gf.get(key("attention.sliding_window"), spec.sliding.default_window) or 0)
        pattern = int(gf.get(key("attention.sliding_window_pattern"), spec.sliding.default_pattern))
        default_base = spec.sliding.default_rope_base
        swa_base = float(gf.get(key("rope.freq_base_swa"), base if default_base is None else default_base))
        # Sliding layers scale like global ones (gemma2) or not at all (gemma3).
        local_rope = (
            replace(global_rope, base=swa_base) if spec.sliding.rope_scaling
            else RopeParams(n_rot, swa_base, 1.0, factors)
        )

    def is_sliding(il: int) -> bool:
        return window > 0 and il % pattern < pattern - 1

    moe = _read_moe(gf, spec, n_ff[0])
    n_dense_lead, moe_step = 0, 1
    if moe is not None:
        assert spec.experts is not None
        if spec.experts.routing_keys:
            n_dense_lead = int(gf.get(key("leading_dense_block_count"), 0))
        if spec.experts.interleaved:
            moe_step = gf.require(key("interleave_moe_layer_step"))
            if type(moe_step) is not int or moe_step < 1:
                raise ModelFileError(
                    f"{path}: {key('interleave_moe_layer_step')}={moe_step!r} must be a positive count"
                )
        _check_expert_tensors(gf, moe, [il for il in range(n_layer) if _is_moe(il, n_dense_lead, moe_step)], n_embd)

    # NoPE layers (llama4): every `step`-th layer, unless the file's sliding_window is 0.
    nope_step = 0
    if spec.nope is not None and gf.get(key("attention.sliding_window"), None) != 0:
        nope_step = spec.nope.step
    qk_l2 = (
        spec.nope is not None and spec.nope.l2_norm
        and (moe is None or moe.n_expert != spec.nope.l2_norm_off_experts)
    )
    rope_on = _rope_switch(gf, key("rope.scaling.finetuned")) if spec.rope_switch else True

    def layer_rope(il: int) -> RopeParams | None:
        if not rope_on or (nope_step and (il + 1) % nope_step == 0):
            return None
        return local_rope if is_sliding(il) else global_rope

    layers = tuple(
        LayerParams(
            n_head=n_head[il],
            n_head_kv=n_head_kv[il],
            n_ff=n_ff[il],
            sliding_window=window if is_sliding(il) else 0,
            rope=layer_rope(il),
            moe=moe if _is_moe(il, n_dense_lead, moe_step) else None,
            qk_l2_norm=qk_l2 and layer_rope(il) is not None,
            attn_chunk=spec.nope.chunk if spec.nope is not None and nope_step and layer_rope(il) is not None else 0,
        )
        for il in range(n_layer)
    )

    eps_key = "attention.layer_norm_rms_epsilon" if spec.norm is Norm.RMS else "attention.layer_norm_epsilon"
    attn_softcap = None
    if spec.attn_softcap_default is not None:
        attn_softcap = float(gf.get(key("attn_logit_softcapping"), spec.attn_softcap_default))
    final_softcap = spec.final_softcap_default
    if spec.final_softcap_key:
        final_softcap = gf.get(key("final_logit_softcapping"), final_softcap)
        final_softcap = float(final_softcap) if final_softcap else None

    embed_scale = float(n_embd) ** 0.5 if spec.embed_scale else None
    residual_scale, logit_scale = 1.0, 1.0
    if spec.scales:  # granite; 0 or absent means no scaling, as in llama.cpp (logit_scale is required)
        embed_scale = float(gf.get(key("embedding_scale"), 0.0)) or None
        residual_scale = float(gf.get(key("residual_scale"), 0.0)) or 1.0
        logit_scale = float(gf.require(key("logit_scale"))) or 1.0
        for name, value in (("embedding_scale", embed_scale), ("residual_scale", residual_scale),
                            ("logit_scale", logit_scale)):
            if value is not None and not math.isfinite(value):
                raise ModelFileError(f"{path}: {key(name)}={value} must be a finite number")

    embd = gf.info("token_embd.weight")
    return HParams(
        arch=arch,
        n_layer=n_layer,
        n_block=n_block,
        n_embd=n_embd,
        n_ctx=int(gf.require(key("context_length"))),
        n_vocab=embd.shape[0],
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        norm_eps=float(gf.require(key(eps_key))),
        attn_scale=float(gf.get(key("attention.scale"), 0.0) or 1.0 / math.sqrt(head_dim)) * score_factor,
        attn_softcap=attn_softcap,
        final_softcap=final_softcap,
        layers=layers,
        latent=latent,
        embed_scale=embed_scale,
        residual_scale=residual_scale,
        logit_scale=logit_scale,
    )


def _is_moe(il: int, n_dense_lead: int, step: int) -> bool:
    """Whether layer il has experts: past the leading dense layers, and every `step`-th layer."""
    return il >= n_dense_lead and (il + 1) % step == 0
