"""The fused float32 CPU ops (ppinfer.kernels.fused) against float64 references written here.

rms_norm: x / sqrt(mean(x^2) + eps) * w. glu: act(gate) * up. attend: rotary embedding of q and k (pairs (x[2i],
x[2i+1]) turned by (cos, sin)), the new keys and values stored at their slots of a paged pool
(float32, float16 or bfloat16, or GGUF Q8_0 blocks checked with gguf-py's quantizer; each row
reads its slots through its block table), then softmax
attention under a boolean mask, each query head reading kv head h // (H / Hkv), with
tanh(s / c) * c on the scores when a softcap c is given and a sink logit per head as one more
softmax column whose probability is dropped (gpt-oss) when sinks are given.

Bound: float32 arithmetic on values of order 1 over at most a few hundred terms, against
float64: 1e-5 absolute is loose by two orders of magnitude and would catch any wrong index,
sign or scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from ppinfer.kernels import build, fused

TOL = 1e-5

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None, reason="no kernel library here")


@pytest.fixture(params=["auto", "scalar"])
def isa(request):
    """Attention's dots run with AVX2 and FMA where the CPU has them ("auto") or portable
    ("scalar", what a CPU without AVX2 runs); restored afterwards."""
    build.set_isa(request.param)
    yield build.isa()
    build.set_isa("auto")


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


@pytest.mark.parametrize(
    "shape, w_shape",
    [((3, 5, 64), (64,)), ((1, 1, 576), (576,)), ((2, 3, 4, 16), (4, 16)), ((7, 24), None), ((0, 8), (8,))],
)
def test_rms_norm_matches_float64(shape, w_shape) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(*w_shape, generator=g) if w_shape is not None else None
    got = fused.rms_norm_op()(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_rms_norm(x, w, 1e-6), atol=TOL, rtol=TOL)


def test_rms_norm_of_a_strided_view_and_of_huge_and_zero_rows() -> None:
    base = torch.randn(4, 2, 32)
    x = base[:, 1]  # [4, 32], not contiguous
    x[0] = 0.0  # sqrt(eps) keeps it finite: zeros
    x[1] *= 1e30  # squares overflow float32, not the double sum
    w = torch.randn(32)
    got = fused.rms_norm_op()(x, w, 1e-5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference_rms_norm(x, w, 1e-5), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", [0, 1], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(2, 3, 2 * 24), (1, 1, 2 * 1536), (5, 2 * 7), (0, 8)])
def test_glu_matches_float64(kind: int, shape: tuple[int, ...]) -> None:
    """act(gate) * up over [gate | up]: SiLU x / (1 + e^-x), GELU 0.5 x (1 + tanh(sqrt(2/pi)
    (x + 0.044715 x^3))), values out to +-12 where both saturate."""
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(kind)) * 4
    gate, up = h.double().chunk(2, dim=-1)
    if kind == 0:
        act = gate / (1 + torch.exp(-gate))
    else:
        act = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    got = fused.glu_op()(h, kind)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got.double(), act * up, atol=TOL, rtol=TOL)


def rotate(x: torch.Tensor, rot: torch.Tensor, n_rot: int) -> torch.Tensor:
    """x [b, T, heads, D] float64, rot [b, T, n_rot/2, 2] (cos, sin)."""
    cos, sin = rot[..., 0].double()[:, :, None], rot[..., 1].double()[:, :, None]  # [b, T, 1, n_rot/2]
    y = x.clone()
    even, odd = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    y[..., 0:n_rot:2] = even * cos - odd * sin
    y[..., 1:n_rot:2] = even * sin + odd * cos
    return y


def reference_attend(
    qk, v, rot, k_pool, v_pool, table, cols, mask, n_head, n_rot, scale, softcap, store=True, sinks=None
):
    """Output [b, T, H D] and the pools after the write, in float64: each row's logical cache
    is read through its block table (slot s: block table[row, s // BS], offset s % BS); the
    new keys and values are rounded to the pool's dtype first, as the op stores them (with
    `store` false the pools already hold them). `sinks` [H]: a logit per head joins each
    softmax as one more column whose probability is dropped."""
    b, t, _, d = qk.shape
    hkv, bs = k_pool.shape[1], k_pool.shape[2]
    turned = rotate(qk.double(), rot, n_rot)
    kp, vp = k_pool.double().clone(), v_pool.double().clone()
    for i in range(b if store else 0):
        for j in range(t):
            s = int(cols[i, j])
            block, off = int(table[i, s // bs]), s % bs
            kp[block, :, off] = turned[i, j, n_head:].to(k_pool.dtype).double()
            vp[block, :, off] = v[i, j].to(v_pool.dtype).double()
    n = mask.shape[-1]
    group = n_head // hkv
    logical_k = kp[table].transpose(1, 2).reshape(b, hkv, -1, d)[:, :, :n]  # [b, Hkv, n, D]
    logical_v = vp[table].transpose(1, 2).reshape(b, hkv, -1, d)[:, :, :n]
    keys = logical_k.repeat_interleave(group, dim=1)  # [b, H, n, D]
    values = logical_v.repeat_interleave(group, dim=1)
    q = turned[:, :, :n_head].transpose(1, 2)  # [b, H, T, D]
    scores = q @ keys.transpose(-1, -2) * scale  # [b, H, T, n]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, n_head, 1, 1).expand(b, -1, t, 1)  # [b, H, T, 1]
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.nan_to_num(scores.softmax(-1))[..., :n]  # a query with no visible key: zeros
    y = (probs @ values).transpose(1, 2).reshape(b, t, n_head * d)
    return y, kp, vp


CASES = {
    # b, T, H, Hkv, D, n_rot, softcap, ragged (rows write different slots), block size
    "decode one row": (1, 1, 9, 3, 64, 64, 0.0, False, 4),
    "decode a lane, ragged": (5, 1, 4, 2, 16, 16, 0.0, True, 4),
    "multi-head, partial rotary": (2, 1, 4, 4, 16, 6, 0.0, False, 16),
    "prefill chunk, softcap": (3, 4, 8, 2, 16, 16, 5.0, True, 4),
    "one kv head, odd dims": (2, 3, 3, 1, 10, 4, 0.0, False, 5),
}
POOL = 16  # blocks in the pool; each row's table takes a scattered few of them
SLOTS = 12  # slots each row may use
KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_attend_matches_float64(case: str, kv_dtype: str, sinks: bool, isa: str) -> None:
    b, t, h, hkv, d, n_rot, softcap, ragged, bs = CASES[case]
    dtype = KV_DTYPES[kv_dtype]
    g = torch.Generator().manual_seed(list(CASES).index(case))
    qkv = torch.randn(b, t, h + 2 * hkv, d, generator=g)  # as the fused projection leaves it
    qk, v = qkv[:, :, : h + hkv], qkv[:, :, h + hkv :]
    angles = torch.rand(b, t, n_rot // 2, generator=g) * 6.3
    rot = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [b, T, n_rot/2, 2]
    k_pool = torch.randn(POOL, hkv, bs, d, generator=g).to(dtype)
    v_pool = torch.randn(POOL, hkv, bs, d, generator=g).to(dtype)
    nb = -(-SLOTS // bs)
    table = torch.randperm(POOL, generator=g)[: b * nb].view(b, nb)  # distinct, scattered blocks
    starts = torch.randint(0, SLOTS - t - 2, (b,), generator=g) if ragged else torch.full((b,), 3)
    cols = starts[:, None] + torch.arange(t)  # [b, T]
    n = int(cols.max()) + 1
    mask = torch.rand(b, 1, t, n, generator=g) < 0.6
    mask.scatter_(3, cols[:, None, :, None], True)  # a query always sees its own slot
    sink = torch.randn(h, generator=g) * 2 if sinks else None  # [H]
    expected, k_after, v_after = reference_attend(
        qk, v, rot, k_pool, v_pool, table, cols, mask, h, n_rot, 0.3, softcap, sinks=sink
    )
    k_before = k_pool.clone()

    got = fused.attend_op()(qk, v, rot, k_pool, v_pool, table, cols, mask, h, n_rot, 0.3, softcap, sink)

    assert got.shape == (b, t, h * d) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=TOL, rtol=TOL)
    # Stored keys: float32 rotation rounded once to the pool's dtype (float64's may round the
    # other way at a tie of the narrow type: one unit of its last place).
    ulp = {torch.float32: TOL, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(k_pool.double(), k_after, atol=ulp * 4, rtol=ulp)
    torch.testing.assert_close(v_pool.double(), v_after, atol=0.0, rtol=0.0)
    written = torch.zeros(POOL, bs, dtype=torch.bool)
    written[table.gather(1, cols // bs), cols % bs] = True  # [POOL, BS]: only these slots may change
    assert torch.equal(k_pool.transpose(1, 2)[~written], k_before.transpose(1, 2)[~written])


def gguf_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] float32 -> uint8 [..., D / 32 * 34], quantized by gguf-py."""
    return torch.from_numpy(quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0))


def gguf_dequantized(packed: torch.Tensor) -> torch.Tensor:
    """uint8 Q8_0 blocks [..., R] -> float64 [..., R / 34 * 32], dequantized by gguf-py."""
    return torch.from_numpy(quants.dequantize(packed.numpy(), GGMLQuantizationType.Q8_0).astype(np.float64))


Q8_CASES = {
    # b, T, H, Hkv, D, n_rot, softcap, ragged, block size
    "decode one row": (1, 1, 9, 3, 64, 64, 0.0, False, 4),
    "decode a lane, ragged, softcap": (5, 1, 4, 2, 32, 32, 5.0, True, 4),
    "prefill chunk, partial rotary, 3 blocks a head": (3, 4, 8, 2, 96, 40, 0.0, True, 16),
}


@pytest.mark.parametrize("case", list(Q8_CASES))
def test_attend_over_q8_0_blocks(case: str, isa: str) -> None:
    """A Q8_0 pool: the new values are stored exactly as gguf-py quantizes them, the new keys
    as gguf-py quantizes the rotated keys (within one quantum: the op rotates in float32), and
    the output is float64 attention over the pool's contents as gguf-py dequantizes them."""
    b, t, h, hkv, d, n_rot, softcap, ragged, bs = Q8_CASES[case]
    g = torch.Generator().manual_seed(list(Q8_CASES).index(case))
    qkv = torch.randn(b, t, h + 2 * hkv, d, generator=g)
    qkv[..., :16] *= 3.0  # blocks of different scales within a head
    qk, v = qkv[:, :, : h + hkv], qkv[:, :, h + hkv :]
    angles = torch.rand(b, t, n_rot // 2, generator=g) * 6.3
    rot = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [b, T, n_rot/2, 2]
    k_pool = gguf_q8_0(torch.randn(POOL, hkv, bs, d, generator=g))  # [N, Hkv, BS, D / 32 * 34]
    v_pool = gguf_q8_0(torch.randn(POOL, hkv, bs, d, generator=g))
    k_pool[3, 0, 1] = gguf_q8_0(torch.zeros(d))  # an all-zero slot: scale 0
    nb = -(-SLOTS // bs)
    table = torch.randperm(POOL, generator=g)[: b * nb].view(b, nb)
    starts = torch.randint(0, SLOTS - t - 2, (b,), generator=g) if ragged else torch.full((b,), 3)
    cols = starts[:, None] + torch.arange(t)  # [b, T]
    n = int(cols.max()) + 1
    mask = torch.rand(b, 1, t, n, generator=g) < 0.6
    mask.scatter_(3, cols[:, None, :, None], True)
    k_before = k_pool.clone()

    got = fused.attend_op()(qk, v, rot, k_pool, v_pool, table, cols, mask, h, n_rot, 0.3, softcap)

    blocks, offsets = table.gather(1, cols // bs), cols % bs  # [b, T]
    assert torch.equal(v_pool[blocks, :, offsets], gguf_q8_0(v.contiguous()))
    turned = rotate(qk.double(), rot, n_rot)[:, :, h:].float()  # [b, T, Hkv, D]
    stored, want = gguf_dequantized(k_pool[blocks, :, offsets]), gguf_dequantized(gguf_q8_0(turned.contiguous()))
    quantum = turned.abs().view(b, t, hkv, d // 32, 32).amax(-1).repeat_interleave(32, -1).double() / 127
    assert ((stored - want).abs() <= quantum * 1.01).all()
    written = torch.zeros(POOL, bs, dtype=torch.bool)
    written[blocks, offsets] = True
    assert torch.equal(k_pool.transpose(1, 2)[~written], k_before.transpose(1, 2)[~written])
    k_float, v_float = gguf_dequantized(k_pool), gguf_dequantized(v_pool)  # [N, Hkv, BS, D] float64
    expected, _, _ = reference_attend(qk, v, rot, k_float, v_float, table, cols, mask, h, n_rot, 0.3, softcap, False)
    torch.testing.assert_close(got.double(), expected, atol=TOL, rtol=TOL)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch's intra-op threads set to 2 for the test, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("d", [96, 128])
@pytest.mark.parametrize("kv_dtype", [*KV_DTYPES, "q8_0"])
def test_attend_gives_a_query_the_same_bits_however_its_prompt_is_fed(
    kv_dtype: str, d: int, hkv: int, isa: str
) -> None:
    """37 tokens attended in one prefill, left-padded by 13 slots in a group of two rows (a
    prefill group's shape, the other row longer), one token per call (decode) and in chunks of
    20 and 17: every query's output is the same bits, since each sum runs over its visible keys
    in their order. The float caches are also checked against float64 (more than eight keys a
    query, and heads wider than one 64-lane pass). On 2 threads, a one-token call with one kv
    head splits its 6 query heads between the threads; the bits stay the same."""
    h, bs, length, pad = 6, 16, 37, 13
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(pad + length, h + 2 * hkv, d, generator=g)  # the prompt's tokens last
    others = torch.randn(pad + length, h + 2 * hkv, d, generator=g)
    angles = torch.rand(pad + length, d // 2, generator=g) * 6.3
    rot = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [50, D/2, 2]: position p's rotation
    prompt = qkv[pad:]  # [37, H + 2 Hkv, D]

    def pools() -> tuple[torch.Tensor, torch.Tensor]:
        if kv_dtype == "q8_0":
            shape, dtype = (16, hkv, bs, d // 32 * 34), torch.uint8
        else:
            shape, dtype = (16, hkv, bs, d), KV_DTYPES[kv_dtype]
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def attend(x, rots, table, cols, mask, kv):
        """x [b, T, H + 2 Hkv, D] -> [b, T, H D]."""
        return fused.attend_op()(x[:, :, : h + hkv], x[:, :, h + hkv :], rots, *kv, table, cols, mask, h, d, 0.1, 0.0)

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    table = torch.tensor([[3, 8, 1]])

    def fed(spans: list[tuple[int, int]]) -> torch.Tensor:
        """The prompt alone, one call per span of its tokens -> [37, H D]."""
        kv = pools()
        outs = [
            attend(prompt[None, a:b], rot[None, a:b], table, torch.arange(a, b)[None], causal[None, None, a:b, :b], kv)
            for a, b in spans
        ]
        return torch.cat(outs, dim=1)[0]

    alone, chunks = fed([(0, length)]), fed([(0, 20), (20, length)])
    stepped = fed([(i, i + 1) for i in range(length)])
    mask = torch.zeros(2, 1, pad + length, pad + length, dtype=torch.bool)
    mask[0, 0, :pad, :pad] = torch.eye(pad, dtype=torch.bool)  # padding sees only itself
    mask[0, 0, pad:, pad:] = causal
    mask[1, 0] = torch.ones(pad + length, pad + length, dtype=torch.bool).tril()
    rots = torch.stack([torch.cat([rot[:pad], rot[:length]]), rot])  # [2, 50, D/2, 2]
    tables = torch.tensor([[9, 2, 14, 6], [0, 11, 4, 13]])
    cols = torch.arange(pad + length).expand(2, -1)
    padded = attend(torch.stack([qkv, others]), rots, tables, cols, mask, pools())[0, pad:]
    assert torch.equal(padded, alone) and torch.equal(stepped, alone) and torch.equal(chunks, alone)
    if kv_dtype != "q8_0":
        k_pool, v_pool = pools()
        qk, v = prompt[None, :, : h + hkv], prompt[None, :, h + hkv :]
        cols = torch.arange(length)[None]
        rots = rot[None, :length]
        expected, _, _ = reference_attend(qk, v, rots, k_pool, v_pool, table, cols, causal[None, None], h, d, 0.1, 0.0)
        tol = {"float32": TOL, "float16": 2e-3, "bfloat16": 2e-2}[kv_dtype]
        torch.testing.assert_close(alone[None].double(), expected, atol=tol, rtol=tol)


def test_attend_query_with_no_visible_key_gives_zeros(isa: str) -> None:
    qk, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 1, 8)
    k_pool, v_pool = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    rot = torch.tensor([[[[1.0, 0.0]] * 4]])  # [1, 1, 4, 2]: no rotation
    mask = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    got = fused.attend_op()(qk, v, rot, k_pool, v_pool, torch.tensor([[0]]), torch.tensor([[2]]), mask, 2, 8, 1.0, 0.0)
    assert torch.equal(got, torch.zeros(1, 1, 16))


def test_bad_inputs_are_one_line_errors() -> None:
    norm, attend = fused.rms_norm_op(), fused.attend_op()
    with pytest.raises(RuntimeError, match="rms_norm: x must be a float32 CPU tensor, got BFloat16"):
        norm(torch.randn(2, 8, dtype=torch.bfloat16), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"rms_norm: w must be float32 \[8\]"):
        norm(torch.randn(2, 8), torch.randn(4), 1e-5)
    with pytest.raises(RuntimeError, match=r"glu: h must be a float32 CPU tensor \[..., 2F\], got Float \[2, 7\]"):
        fused.glu_op()(torch.randn(2, 7), 0)
    with pytest.raises(RuntimeError, match="glu: kind must be 0"):
        fused.glu_op()(torch.randn(2, 8), 2)
    qk, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 1, 8)
    k_pool, v_pool = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    rot, mask = torch.ones(1, 1, 4, 2), torch.ones(1, 1, 1, 4, dtype=torch.bool)
    table = torch.tensor([[0]])
    with pytest.raises(RuntimeError, match="attend: slot 9 outside a table of 1 blocks of 4"):
        attend(qk, v, rot, k_pool, v_pool, table, torch.tensor([[9]]), mask, 2, 8, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="attend: block 1 of row 0 outside a pool of 1"):
        attend(qk, v, rot, k_pool, v_pool, torch.tensor([[1]]), torch.tensor([[0]]), mask, 2, 8, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"attend: qk \[1, 1, 3, 8\] for 3 query heads"):
        attend(qk, v, rot, k_pool, v_pool, table, torch.tensor([[0]]), mask, 3, 8, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="attend: mask must be bool"):
        attend(qk, v, rot, k_pool, v_pool, table, torch.tensor([[0]]), mask.float(), 2, 8, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"attend: sinks must be float32 \[2\] on the CPU, got Float \[3\]"):
        attend(qk, v, rot, k_pool, v_pool, table, torch.tensor([[0]]), mask, 2, 8, 1.0, 0.0, torch.zeros(3))
    with pytest.raises(RuntimeError, match="attend: k_pool must be a contiguous float32, float16 or bfloat16"):
        attend(qk, v, rot, k_pool.double(), v_pool.double(), table, torch.tensor([[0]]), mask, 2, 8, 1.0, 0.0)


def test_available_only_for_float32_on_the_cpu() -> None:
    assert fused.available(torch.device("cpu"), torch.float32)
    assert not fused.available(torch.device("cpu"), torch.bfloat16)
    assert not fused.available(torch.device("cuda"), torch.float32)
