"""Times the CPU block kernels against float32 F.linear on the dequantized weight.

    python -m ppinfer.kernels.bench [--threads 1 2] [--rows 1 16] [--types Q4_0 Q4_1 Q8_0]
                                    [--shapes 11008x4096 2048x2048 5632x2048] [--isa avx2 avxvnni]
                                    [--copies 8]

Prints a markdown table (the one in docs/kernels.md) per instruction set named (`--isa`, the
default "auto"): best-of-N milliseconds per product,
and the weight bytes each product reads per second; for the types with a packed layout also
`packed_matmul` on the same weight packed (csrc/packed.cpp). `--copies N` cycles through N
copies of each weight per timed run, so that they come from memory rather than the caches.
Weights are random blocks with sane fp16 scales (speed does not depend on the values). The
first lines give this machine's single-thread read and copy bandwidth, the bound a decode-sized
product approaches. Large M (a prefill chunk, `--rows 512`) shows the 8-bit GEMM's rate; GMAC/s
counts M * N * k per second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ppinfer.kernels import build
from ppinfer.kernels.blocks import SCALE_OFFSETS

SHAPES = ((11008, 4096), (2048, 2048), (5632, 2048))  # (out_features, in_features)


def best_ms(fn, min_seconds: float = 0.3, min_runs: int = 5) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def random_blocks(qtype: GGMLQuantizationType, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, row_bytes] uint8: random codes, fp16 scales in [-0.01, 0.01] (MXFP4: power-of-two
    scales 2^-16 .. 2^-4)."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n * k // block_elems, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scales = rng.uniform(-0.01, 0.01, raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    if qtype == GGMLQuantizationType.MXFP4:
        raw[:, 0] = rng.integers(112, 125, raw.shape[0])  # e8m0: 2^(e - 128)
    return torch.from_numpy(raw.reshape(n, -1))


def bandwidth_lines() -> list[str]:
    torch.set_num_threads(1)
    src = torch.ones(64 << 20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    read = nbytes / best_ms(lambda: src.sum()) / 1e6
    copy = nbytes / best_ms(lambda: dst.copy_(src)) / 1e6
    return [f"single-thread read (sum of 256 MiB): {read:.1f} GB/s; copy: {copy:.1f} GB/s copied"]


def table(
    threads: list[int], rows: list[int], types: list[GGMLQuantizationType], shapes=SHAPES, copies: int = 1
) -> list[str]:
    ops = build.ops()
    packable = set(ops.packed_qtypes())
    rng = np.random.default_rng(0)
    lines = [
        "| W (N x k) | type | M | threads | block_matmul ms | GB/s (weights) | GMAC/s | packed ms | packed speedup "
        "| F.linear f32 ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, k in shapes:
        for qtype in types:
            if k % GGML_QUANT_SIZES[qtype][0]:
                continue
            w = random_blocks(qtype, n, k, rng)
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            wps = [ops.pack_rows(c, int(qtype), k) for c in ws] if int(qtype) in packable else []
            dense = ops.dequantize(w, int(qtype), k)  # [n, k]
            for m in rows:
                x = torch.randn(m, k)

                def row_major(x=x, qtype=qtype, k=k, ws=ws) -> None:
                    for c in ws:
                        ops.block_matmul(x, c, int(qtype), k)

                def packed_rows(x=x, qtype=qtype, n=n, k=k, wps=wps) -> None:
                    for c in wps:
                        ops.packed_matmul(x, c, int(qtype), k, n)

                for t in threads:
                    torch.set_num_threads(t)
                    ms = best_ms(row_major) / copies
                    packed = "-", "-"
                    if wps:
                        pms = best_ms(packed_rows) / copies
                        packed = f"{pms:.3f}", f"{ms / pms:.2f}x"
                    ref = best_ms(lambda x=x, dense=dense: F.linear(x, dense))
                    gbs = w.numel() / ms / 1e6
                    gmacs = m * n * k / ms / 1e6
                    lines.append(
                        f"| {n}x{k} | {qtype.name} | {m} | {t} | {ms:.3f} | {gbs:.1f} | {gmacs:.0f} | {packed[0]} "
                        f"| {packed[1]} | {ref:.2f} | {ref / ms:.1f}x |"
                    )
    return lines


def shape(text: str) -> tuple[int, int]:
    """"2048x5632" -> (2048, 5632)."""
    try:
        n, k = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxK (e.g. 2048x5632), got {text!r}") from None
    return n, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q8_0"])
    parser.add_argument("--shapes", type=shape, nargs="+", help="weights as NxK (out x in features)")
    parser.add_argument(
        "--isa",
        nargs="+",
        default=["auto"],
        help="instruction sets (a table each): auto, avx512vnni, avxvnni, avx2, scalar",
    )
    parser.add_argument("--copies", type=int, default=1, help="copies of each weight cycled per timed run")
    args = parser.parse_args()
    types = [GGMLQuantizationType[name] for name in args.types]
    for line in bandwidth_lines():
        print(line, flush=True)
    for isa in args.isa:
        build.set_isa(isa)
        print(f"isa: {build.isa()}")
        for line in table(args.threads, args.rows, types, args.shapes or SHAPES, max(1, args.copies)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
