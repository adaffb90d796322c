"""The CPU block kernels (ppinfer.kernels) against gguf-py, the independent reference.

Every type the kernels report (`supported_types()`, legacy and K-quants alike) runs through
the same tests; the only per-type facts are the tables below, read off ggml's block layouts.

Weights: blocks from gguf-py's quantizer where it has one for the type, and random bytes with
chosen fp16 scales (tiny, subnormal, huge, zero, negative) for every type.
Reference: gguf-py's dequantize, then a float64 matmul.

Bound for block_matmul (activations quantized to 8 bits, for any number of rows). x is rounded per 32-value block
b to dx_b * q with dx_b = max|x_b| / 127 and |x_i - dx_b q_i| <= dx_b / 2, so the product
with the dequantized weight W differs from the exact one by at most

    quant = sum_b dx_b / 2 * sum_{i in b} |W_i|.

The kernels then sum per-block float terms. A block's terms are d * dx * sum(q * qx) and an
offset term o * s (o = the value a zero code decodes to, s = dx * sum(qx)), each bounded by
(|W_i| + |O_i|) |qx_i dx|; with |qx_i dx| <= |x_i| + dx and at most k/32 + 16 roundings in
any chain (k/32 block sums plus a few per block and the final lane sums),

    accum = (k/32 + 16) * 2^-24 * sum_i (|W_i| + 2 |O_i|) (|x_i| + dx_b(i)).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import ISAS
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ppinfer.kernels import build, cpu, select
from ppinfer.kernels.blocks import SCALE_OFFSETS

EPS32 = 2.0**-24  # unit roundoff of float32
LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
TYPES = cpu.supported_types()
# Byte ranges of each block that hold codes (not scales): zeroed, a block decodes to its
# offsets O (ggml's block layouts; SCALE_OFFSETS in ppinfer.kernels.blocks has the fp16 scales).
CODE_BYTES: dict[Q, tuple[tuple[int, int], ...]] = {
    Q.Q4_0: ((2, 18),),
    Q.Q4_1: ((4, 20),),
    Q.Q5_0: ((2, 22),),
    Q.Q5_1: ((4, 24),),
    Q.Q8_0: ((2, 34),),
    Q.Q2_K: ((16, 80),),
    Q.Q3_K: ((0, 96),),
    Q.Q4_K: ((16, 144),),
    Q.Q5_K: ((16, 176),),
    Q.Q6_K: ((0, 192),),
    Q.MXFP4: ((1, 17),),
}
# Byte offsets of e8m0 scales (2^(e - 128)): drawn from E8M0_SCALES, which keep the products
# within float32 (e = 255 would make 2^127 weights).
E8M0_OFFSETS: dict[Q, tuple[int, ...]] = {Q.MXFP4: (0,)}
E8M0_SCALES = np.array([0, 1, 2, 100, 118, 127, 128, 131, 140, 150], dtype=np.uint8)
# fp16 scales for the random-byte blocks: zero, subnormal, tiny, ordinary, huge, both signs.
SCALES = np.array([0.0, 6e-8, -6e-8, 1e-5, 0.01, -0.01, 0.3, -2.0, 3e4, -65504.0], dtype=np.float16)
# x rows, one of each way block_matmul splits them (ops.cpp's RowSplit): 1 and 2 one at a time,
# 5 as 4 paired + 1, 13 as 8 + 4 paired + 1, 23 as 3 groups of 8 (the last padded), 36 as 4
# groups (two tile calls) + 4 paired, 200 as a prefill-sized product (25 groups, 9 tile calls).
ROW_COUNTS = (1, 2, 5, 13, 23, 36, 200)




def row_values(qtype: Q) -> int:
    """k for the tests: an odd number of blocks (the SIMD loops take blocks in pairs)."""
    block_elems = GGML_QUANT_SIZES[qtype][0]
    return block_elems * (15 if block_elems == 32 else 3)


def random_byte_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, row_bytes] uint8: random codes, each fp16 scale field drawn from SCALES."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // block_elems, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        halves = rng.choice(SCALES, blocks.shape[0])
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    for offset in E8M0_OFFSETS.get(qtype, ()):
        blocks[:, offset] = rng.choice(E8M0_SCALES, blocks.shape[0])
    return blocks.reshape(n, -1)


def quantized_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, row_bytes] uint8 from gguf-py's quantizer, over floats whose 32-value groups range
    from zero to large, with constant groups and sign-mixed groups."""
    values = rng.standard_normal((n, k // 32, 32)) * rng.choice([0.0, 1e-4, 0.05, 1.0, 300.0], (n, k // 32, 1))
    values[:, ::5] = np.abs(values[:, ::5]) + 1.0  # one-signed groups with an offset (Q4_1's m)
    values[:, 1::7] = -2.5  # constant groups
    return gguf.quants.quantize(values.reshape(n, k).astype(np.float32), qtype)


def weight_cases(qtype: Q, n: int, k: int) -> list[np.ndarray]:
    rng = np.random.default_rng(int(qtype))
    cases = [random_byte_blocks(qtype, n, k, rng)]
    with contextlib.suppress(NotImplementedError):  # gguf-py dequantizes but cannot quantize K-quants
        cases.append(quantized_blocks(qtype, n, k, rng))
    return cases


def activations(rows: int, k: int, seed: int) -> torch.Tensor:
    """[rows, k] float32 with 32-value blocks of mixed magnitudes, some all zero."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.0, 1e-3, 1.0, 30.0], (rows, k // 32, 1))
    return torch.from_numpy((rng.standard_normal((rows, k // 32, 32)) * scale).reshape(rows, k).astype(np.float32))


def offsets(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """[n, k] float64: the value of each weight with its code zeroed (O in the bound)."""
    assert qtype in CODE_BYTES, f"add {qtype.name}'s code byte ranges to CODE_BYTES"
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, block_bytes).copy()
    for lo, hi in CODE_BYTES[qtype]:
        blocks[:, lo:hi] = 0
    return gguf.quants.dequantize(blocks.reshape(raw.shape), qtype).astype(np.float64)


def quant_bound(x: torch.Tensor, w: np.ndarray) -> np.ndarray:
    """[M, N]: `quant` of the module docstring, for x [M, k] and W [N, k] float64."""
    rows, k = x.shape
    dx = np.abs(x.double().numpy()).reshape(rows, k // 32, 32).max(axis=-1) / 127.0  # [M, k/32]
    return (dx / 2) @ np.abs(w).reshape(len(w), k // 32, 32).sum(-1).T


def accum_bound(x: torch.Tensor, w: np.ndarray, o: np.ndarray) -> np.ndarray:
    """[M, N]: `accum` of the module docstring, for x [M, k], W and O [N, k] float64."""
    rows, k = x.shape
    xb = np.abs(x.double().numpy()).reshape(rows, k // 32, 32)
    x_mag = (xb + xb.max(axis=-1, keepdims=True) / 127.0).reshape(rows, k)  # bounds |dx * qx|
    return (k / 32 + 16) * EPS32 * (x_mag @ (np.abs(w) + 2 * np.abs(o)).T)


# ---- the library and its types ----


def test_kernels_build_here_with_every_legacy_type() -> None:
    assert build.unavailable_reason() is None, build.unavailable_reason()
    assert set(LEGACY) <= set(TYPES)
    assert all(t in CODE_BYTES for t in TYPES), "every kernel type needs its CODE_BYTES entry"


def test_auto_isa_follows_the_cpu_flags(ops) -> None:
    flags_file = Path("/proc/cpuinfo")
    if not flags_file.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    flags = set(re.search(r"^flags\s*:(.*)$", flags_file.read_text(), re.M).group(1).split())
    runs = {
        "scalar": True,
        "avx2": {"avx2", "fma", "f16c"} <= flags,
        "avxvnni": {"avx2", "fma", "f16c", "avx_vnni"} <= flags,
        "avx512vnni": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags,
    }
    try:
        ops.set_isa("auto")
        assert ops.isa() == next(name for name in ISAS if runs[name])
        for name in ISAS:
            assert (ops.isa_unavailable(name) == "") == runs[name], name
            if runs[name]:  # every variant this CPU runs can be forced, the lower ones included
                ops.set_isa(name)
                assert ops.isa() == name
            else:
                with pytest.raises(RuntimeError, match=f"cannot run '{name}' here: this CPU lacks"):
                    ops.set_isa(name)
    finally:
        ops.set_isa("auto")


def test_kernel_isa_env_forces_a_run_s_instruction_set(ops, monkeypatch: pytest.MonkeyPatch) -> None:
    """PPINFER_KERNEL_ISA picks the variant a whole run takes (the stage table names it); a name
    that is not a variant, or one this CPU lacks, is one error line naming the value."""
    try:
        for name in ISAS:
            monkeypatch.setenv(select.ISA_ENV, name)
            if ops.isa_unavailable(name):
                with pytest.raises(ValueError, match=f"PPINFER_KERNEL_ISA='{name}': this CPU cannot run it"):
                    select.block_backend(torch.device("cpu"))
                continue
            backend = select.block_backend(torch.device("cpu"))
            assert backend.describe().startswith(f"block kernels ({name}")
            # Rows are packed where the SIMD kernels run; the portable path reads them row-major.
            assert (Q.Q4_0 in backend.packed) == (Q.Q4_K in backend.packed) == (name != "scalar")
            assert ops.isa() == name
        monkeypatch.setenv(select.ISA_ENV, "avx512")
        with pytest.raises(ValueError, match="PPINFER_KERNEL_ISA='avx512': expected one of auto, avx512vnni"):
            select.block_backend(torch.device("cpu"))
    finally:
        ops.set_isa("auto")


def test_row_split_runs_on_torchs_threads() -> None:
    """at::parallel_for is an OpenMP region compiled into the library where torch's threads are
    OpenMP's: built without -fopenmp it silently runs on one thread."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's intra-op threads are not OpenMP's here")
    assert b"GOMP_parallel" in build.library().path.read_bytes()


def test_missing_compiler_is_a_one_line_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    result = build.library.__wrapped__()  # a fresh attempt, not this process's loaded library
    assert result.path is None
    assert result.reason == f"no C++ compiler: '{tmp_path / 'no-such-c++'}' is not on PATH (install g++, or set CXX)"


def test_compile_error_is_a_one_line_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "broken.cpp").write_text("int f() { return undeclared_name; }\n")
    monkeypatch.setattr(build, "CSRC", sources)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = build.library.__wrapped__()
    assert result.path is None and "\n" not in result.reason
    assert result.reason.startswith("building the CPU block kernels failed: ")
    assert "undeclared_name" in result.reason and str(tmp_path / "cache") in result.reason


# ---- dequantize ----


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_py(ops, qtype: Q) -> None:
    k = row_values(qtype)
    for raw in weight_cases(qtype, 37, k):
        got = ops.dequantize(torch.from_numpy(raw), int(qtype), k).numpy()
        want = gguf.quants.dequantize(raw, qtype)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


# ---- block_matmul ----


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_block_matmul_within_the_q8_bound(ops, isa: str, qtype: Q) -> None:
    k = row_values(qtype)
    for case, raw in enumerate(weight_cases(qtype, 37, k)):
        w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
        o = offsets(raw, qtype)
        for rows in ROW_COUNTS:
            x = activations(rows, k, seed=rows + 10 * case)
            got = ops.block_matmul(x, torch.from_numpy(raw), int(qtype), k).double().numpy()
            err = np.abs(got - x.double().numpy() @ w.T)
            bound = quant_bound(x, w) + accum_bound(x, w, o)
            worst = np.unravel_index(np.argmax(err - bound), err.shape)
            assert (err <= bound).all(), f"case {case}, M={rows}: error {err[worst]} > bound {bound[worst]} at {worst}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_block_matmul_is_exact_where_x_is_q8(ops, isa: str, qtype: Q) -> None:
    """x blocks 2^e * q with integer |q| <= 127 and a 127 in each block quantize exactly
    (dx = 2^e), so only the accumulation error remains: any wrong code, scale or offset
    shows far above it."""
    k = row_values(qtype)
    rng = np.random.default_rng(11)
    q = rng.integers(-127, 128, (3, k // 32, 32))
    q[..., 0] = 127 * rng.choice([-1, 1], (3, k // 32))
    x = torch.from_numpy((q * 2.0 ** rng.integers(-12, 6, (3, k // 32, 1))).reshape(3, k).astype(np.float32))
    for raw in weight_cases(qtype, 37, k):
        w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
        got = ops.block_matmul(x, torch.from_numpy(raw), int(qtype), k).double().numpy()
        assert (np.abs(got - x.double().numpy() @ w.T) <= accum_bound(x, w, offsets(raw, qtype))).all()


def test_activations_round_to_nearest_q8(ops, isa: str) -> None:
    """Through an identity Q8_0 weight (d = 1, one-hot codes) the product returns the quantized
    activations dx * q themselves: q = round-half-even(x / dx), dx = max|x_block| / 127."""
    k = 64
    blocks = np.zeros((k, k // 32, 34), dtype=np.uint8)  # row i: value 1 at column i
    blocks[..., 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    for i in range(k):
        blocks[i, i // 32, 2 + i % 32] = 1
    x = activations(5, k, seed=13)
    x[0, :32] = (torch.arange(32) - 15.5) / 8  # dx = 1/8 (the 127 below): x / dx = n + 1/2, ties
    x[0, 0] = 127 / 8
    got = ops.block_matmul(x, torch.from_numpy(blocks.reshape(k, -1)), int(Q.Q8_0), k).numpy()
    xb = x.numpy().reshape(5, k // 32, 32)
    dx = np.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), 0).astype(np.float32)
    want = (dx * np.rint(xb * inv)).reshape(5, k)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_instruction_sets_agree(ops, use_isa, qtype: Q) -> None:
    """Every SIMD variant does each output's float chain with the same operations in the same
    order (only the integer block dots, which are exact, differ in how they are computed), so
    AVX-512 VNNI, AVX-VNNI and AVX2 give the same bits (those of them this CPU runs); the
    portable code sums in another order, within twice the accumulation bound of them. 45 rows:
    two groups of 16 for AVX-512, then 8 + 4 + 1, and on the others 5 x 8 (tiles) + 4 (pair
    tile) + 1; 1 and 2 rows: the weight-rows kernels (decode), AVX-512's and AVX-VNNI's against
    AVX2's."""
    k = row_values(qtype)
    wider = [name for name in ("avx512vnni", "avxvnni") if not ops.isa_unavailable(name)]
    for case, raw in enumerate(weight_cases(qtype, 37, k)):
        w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
        o = offsets(raw, qtype)
        for rows in (1, 2, 45):
            x = activations(rows, k, seed=5 + rows)
            results = {}
            for name in ["avx2", "scalar", *wider]:
                use_isa(name)
                results[name] = ops.block_matmul(x, torch.from_numpy(raw), int(qtype), k).double().numpy()
            for name in wider:
                np.testing.assert_array_equal(results[name], results["avx2"], err_msg=f"{name}, case {case}, M={rows}")
            assert (np.abs(results["avx2"] - results["scalar"]) <= 2 * accum_bound(x, w, o)).all()


@pytest.mark.parametrize("rows", [1, 5, 16, 23])
def test_row_split_over_threads_changes_nothing(ops, use_isa, rows: int) -> None:
    use_isa("auto")
    raw = weight_cases(Q.Q4_0, 301, 512)[0]
    x = activations(rows, 512, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.block_matmul(x, torch.from_numpy(raw), int(Q.Q4_0), 512)
        torch.set_num_threads(2)
        two = ops.block_matmul(x, torch.from_numpy(raw), int(Q.Q4_0), 512)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("k", [768, 8192])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_result_of_a_row_does_not_depend_on_its_batch(ops, isa: str, qtype: Q, k: int) -> None:
    """A row's output is the same bits alone, among 2 to 23 rows, 29, 36, 48 or 200, on one
    thread or two, so a sequence's greedy tokens do not depend on what shares its products:
    every way block_matmul splits x rows (groups of 8 x rows against one weight row, 4 x rows
    against two, one x row against 8 weight rows, many groups at once) meets every other;
    k = 8192 spans several k-chunks; 9 weight rows leave a short group of weight rows (and an
    odd one out of a pair)."""
    rng = np.random.default_rng(5)
    raw = torch.from_numpy(random_byte_blocks(qtype, 9, k, rng))
    x = torch.randn(200, k, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([ops.block_matmul(x[m : m + 1], raw, int(qtype), k) for m in range(200)])
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows in [*range(2, 24), 29, 36, 48, 200]:
                together = ops.block_matmul(x[:rows], raw, int(qtype), k)
                assert torch.equal(together, alone[:rows]), f"M={rows}, {threads} threads"
    finally:
        torch.set_num_threads(before)


# ---- packed rows (16 rows interleaved block by block) ----

PACKED = tuple(sorted(cpu.packed_types()))  # every type with the layout, whatever the CPU runs


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_rows_unpack_to_the_stored_rows(ops, qtype: Q) -> None:
    k = row_values(qtype)
    for raw in weight_cases(qtype, 37, k):  # 37 rows: two full groups of 16 and a short one
        packed = ops.pack_rows(torch.from_numpy(raw), int(qtype), k)
        assert packed.shape == (3, 16 * raw.shape[1])
        assert torch.equal(ops.unpack_rows(packed, int(qtype), k, 37), torch.from_numpy(raw))


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_matmul_is_block_matmul_bit_for_bit(ops, isa: str, qtype: Q) -> None:
    """Packed products follow every output's chain of the row-major ones, so they are the same
    bits (and so within test_block_matmul_within_the_q8_bound of gguf-py) for every number of x
    rows (1 to 4 in one call, more in calls of 4 and k-chunks), on one thread or two, with a
    short last group (37 rows), and k = 8192 spanning many chunks."""
    rng = np.random.default_rng(3)
    for n, k in ((37, 256), (19, 8192)):
        raw = torch.from_numpy(random_byte_blocks(qtype, n, k, rng))
        packed = ops.pack_rows(raw, int(qtype), k)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        x = torch.randn(41, k, generator=torch.Generator().manual_seed(k))
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for rows in (1, 2, 3, 4, 5, 9, 17, 41):
                    want = ops.block_matmul(x[:rows], raw, int(qtype), k, bias)
                    got = ops.packed_matmul(x[:rows], packed, int(qtype), k, n, bias)
                    assert torch.equal(got, want), f"n={n} k={k} M={rows}, {threads} threads"
        finally:
            torch.set_num_threads(before)


def test_block_linear_packs_rows_where_asked(ops) -> None:
    qtype, k, n = Q.Q4_0, 64, 21
    raw = torch.from_numpy(weight_cases(qtype, n, k)[0].copy())
    bias = torch.randn(n)
    plain, packed = cpu.BlockLinear(raw, qtype, k, bias), cpu.BlockLinear(raw, qtype, k, bias, packed=True)
    assert packed.packed and packed.w.shape == (2, 16 * raw.shape[1])  # 21 rows fill two groups
    assert torch.equal(packed.rows(), raw)
    x = activations(3, k, seed=4)
    assert torch.equal(packed(x), plain(x))
    with pytest.raises(ValueError, match="Q5_0 has no packed layout"):
        cpu.BlockLinear(torch.zeros(4, 44, dtype=torch.uint8), Q.Q5_0, 64, packed=True)


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) <= address < int(head[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_streamed_weights_sit_on_huge_pages(ops) -> None:
    """Weight buffers of 2 MiB or more are advised onto 2 MiB pages (a decode step then misses
    the TLB once a huge page, not once every 4 KiB), in the plain and the packed layout; smaller
    ones are ordinary tensors. The blocks are the stored ones either way."""
    small = ops.empty_on_huge_pages([3, 5])
    assert small.shape == (3, 5) and small.dtype == torch.uint8
    qtype, k, n = Q.Q4_0, 4096, 1024  # 2.25 MiB of blocks
    raw = torch.from_numpy(random_byte_blocks(qtype, n, k, np.random.default_rng(5)))
    for packed in (False, True):
        layer = cpu.BlockLinear(raw, qtype, k, packed=packed)
        assert torch.equal(layer.rows(), raw)
        assert anon_huge_kib(layer.w.data_ptr()) >= 2048, f"packed={packed}"


# ---- BlockLinear ----


def test_block_linear_shapes_dtypes_and_bias(ops) -> None:
    qtype, k, n, rows = Q.Q4_1, 64, 24, 40
    raw = weight_cases(qtype, n, k)[1]
    bias = torch.randn(n)
    layer = cpu.BlockLinear(torch.from_numpy(raw.copy()), qtype, k, bias)
    assert (layer.in_features, layer.out_features) == (k, n)
    assert layer.nbytes == raw.nbytes + 4 * n
    x = activations(2 * rows, k, seed=9).reshape(2, rows, k)
    y = layer(x)
    assert y.shape == (2, rows, n) and y.dtype == torch.float32
    plain = ops.block_matmul(x.reshape(-1, k), torch.from_numpy(raw), int(qtype), k)  # [2 * rows, n]
    torch.testing.assert_close(y.reshape(-1, n), plain + bias, rtol=0, atol=1e-5 * float(plain.abs().max()))
    # bfloat16 activations are widened exactly, so the result is the float32 one, rounded.
    xb = x.to(torch.bfloat16)
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, layer(xb.float()).to(torch.bfloat16))


def test_block_linear_rejects_mismatched_weights() -> None:
    raw = torch.zeros(4, 18, dtype=torch.uint8)  # one Q4_0 block per row
    with pytest.raises(ValueError, match="bytes per row"):
        cpu.BlockLinear(raw, Q.Q4_0, 64)
    with pytest.raises(ValueError, match="multiple of Q4_0's 32-value blocks"):
        cpu.BlockLinear(raw, Q.Q4_0, 40)
    with pytest.raises(ValueError, match="2-D uint8"):
        cpu.BlockLinear(raw.float(), Q.Q4_0, 32)


# ---- bad inputs to the ops ----


def test_bad_inputs_give_clear_errors(ops) -> None:
    w = torch.zeros(4, 2 * 18, dtype=torch.uint8)  # 4 rows of two Q4_0 blocks: k = 64
    x = torch.zeros(2, 64)
    cases = [
        (
            lambda: ops.block_matmul(x, w[:, :35].contiguous(), 2, 64),
            "w has 35 bytes per row; a row of k=64 values of GGML type 2 takes 36",
        ),
        (lambda: ops.block_matmul(x[:, :48], w, 2, 48), "k=48 is not a positive multiple of the 32-value blocks"),
        (lambda: ops.block_matmul(x, w, 99, 64), "no CPU block kernel for GGML type 99"),
        (lambda: ops.block_matmul(x.double(), w, 2, 64), "x must be float32 or bfloat16"),
        (lambda: ops.block_matmul(x[:, :32], w, 2, 64), r"x must be \[..., k=64\]"),
        (lambda: ops.block_matmul(x, w.to(torch.int8), 2, 64), "w must be uint8 blocks"),
        (lambda: ops.block_matmul(x, w.reshape(-1), 2, 64), r"w must be \[N, row_bytes\]"),
        (lambda: ops.block_matmul(x.to("meta"), w, 2, 64), "x must be on the CPU"),
        (lambda: ops.block_matmul(x, w, 2, 64, torch.zeros(5)), r"bias must be a float32 or bfloat16 CPU tensor \[4\]"),
        (lambda: ops.dequantize(w, 2, 60), "k=60 is not a positive multiple"),
        (lambda: ops.set_isa("avx512"), "expected 'auto', 'scalar', 'avx2', 'avxvnni' or 'avx512vnni', got 'avx512'"),
        (lambda: ops.pack_rows(w, 6, 64), "GGML type 6 has no packed layout"),
        (lambda: ops.pack_rows(w[:, :18], 2, 64), "w has 18 bytes per row; k=64 takes 36"),
        (lambda: ops.packed_matmul(x, w, 2, 64, 4), r"packed weights have shape \[4, 36\], expected \[1, 576\]"),
        (
            lambda: ops.packed_matmul(x[:, :32], ops.pack_rows(w, 2, 64), 2, 64, 4),
            r"x must be a float32 or bfloat16 CPU tensor \[..., k=64\]",
        ),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
