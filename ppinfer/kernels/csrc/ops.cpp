// Torch ops over stored GGUF blocks (namespace ppinfer_kernels), on the per-type kernels of
// legacy.cpp and kquants.cpp.
//
// block_matmul(x [..., k], w [N, row_bytes]) = x @ dequant(w).T, one numeric path for every
// number of x rows: each x row is quantized to Q8Blocks (the same blocks whether it comes alone
// or with hundreds of others), then torch's intra-op threads split the weight rows, 8 at a
// time, and dot them with every x row while they are in cache (the weights are read in their
// stored size, and prefetched ahead of the dots). Every output is one float chain over its
// blocks in order, each block's dot exact in integers (qtypes.h), so a row's result is the
// same bits whatever else shares the product: greedy answers do not depend on the batch.
// The AVX2 kernels keep one output's float chain per vector lane: groups of 8 x rows go to the
// type's tile kernel, which decodes each weight block once for all of them (up to
// kMaxTileGroups groups a call, each chunk of x tiles reused by a group of 8 weight rows while
// it is in L1: prefill's 8-bit GEMM), 4 x rows left over to its pair tile kernel (two weight
// rows per vector), and the rest (all x rows when there are few) to its weight-rows kernel,
// 8 weight rows against one or two x rows.
// The AVX2 dots run only where the CPU reports AVX2, FMA and F16C; set_isa("scalar") forces
// the portable ones on any CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "activations.h"
#include "isa.h"
#include "ops.h"
#include "qtypes.h"


namespace ppinfer {
namespace {

// Multiply-adds below which a chunk of work is not split further between threads.
constexpr int64_t kGrainMacs = int64_t{1} << 15;
// Activation blocks per k-chunk of the decode path where x has groups of 8 rows (1024 values:
// 11 KB a group in Q8Tiles, so the up to kMaxTileGroups groups of one tile call stay in L1), and
// the weight rows sharing each chunk. The scalar path sums a row's chunks in order whatever the
// batch; the AVX2 path carries each output's chain from chunk to chunk, so neither the chunk nor
// the number of x rows changes a row's result (pipelines with different lane sizes give
// identical outputs).
constexpr int64_t kXChunkBlocks = 32;
constexpr int64_t kWideChunkBlocks = 8;
constexpr int64_t kRowGroup = kLanes;
// x rows left over after the full groups of kWideLanes (AVX-512) that make one more, padded
// group; fewer go to the AVX2 kernels as below.
constexpr int64_t kMinWideRows = 12;
// What happens to the x rows left over after the full groups of kLanes: from kMinGroupRows on
// they make one more group, padded with zero rows; else from kMinPairRows on the first (up to)
// 4 of them go to the pair tile kernel (two weight rows against 4 x rows per vector); the rest
// go to the weight-rows kernel (measured: docs/kernels.md).
constexpr int64_t kMinGroupRows = 6;
constexpr int64_t kMinPairRows = 3;
constexpr int64_t kPairRows = kLanes / 2;

const QTypeKernels* find_kernels(int64_t qtype) {
  for (int i = 0; i < kLegacyKernelCount; ++i) {
    if (kLegacyKernels[i].ggml_type == qtype) return &kLegacyKernels[i];
  }
  for (int i = 0; i < kKQuantKernelCount; ++i) {
    if (kKQuantKernels[i].ggml_type == qtype) return &kKQuantKernels[i];
  }
  for (int i = 0; i < kLowBitKernelCount; ++i) {
    if (kLowBitKernels[i].ggml_type == qtype) return &kLowBitKernels[i];
  }
  return nullptr;
}

bool use_avx2(const QTypeKernels& t) {
  return active_isa() >= Isa::kAvx2 && t.dot_weight_rows_avx2 != nullptr && t.dot_tile_avx2 != nullptr &&
         t.dot_pair_tile_avx2 != nullptr;
}

bool use_avx512(const QTypeKernels& t) { return active_isa() >= Isa::kAvx512Vnni && t.dot_tile16_avx512 != nullptr; }

// The weight-rows kernel: AVX-512 VNNI's or AVX-VNNI's where it runs (the same bits as AVX2's).
DotWeightRowsFn weight_rows_kernel(const QTypeKernels& t) {
  if (active_isa() >= Isa::kAvx512Vnni && t.dot_weight_rows_avx512 != nullptr) return t.dot_weight_rows_avx512;
  if (active_isa() == Isa::kAvxVnni && t.dot_weight_rows_avxvnni != nullptr) return t.dot_weight_rows_avxvnni;
  return t.dot_weight_rows_avx2;
}

// The tile and pair tile kernels: AVX-VNNI's where it runs (the same bits as AVX2's).
DotTileFn tile_kernel(const QTypeKernels& t) {
  return active_isa() == Isa::kAvxVnni && t.dot_tile_avxvnni != nullptr ? t.dot_tile_avxvnni : t.dot_tile_avx2;
}

DotPairTileFn pair_tile_kernel(const QTypeKernels& t) {
  const bool vnni = active_isa() == Isa::kAvxVnni && t.dot_pair_tile_avxvnni != nullptr;
  return vnni ? t.dot_pair_tile_avxvnni : t.dot_pair_tile_avx2;
}

// ---- argument checks ----

struct Shape {
  const QTypeKernels* kernels;
  int64_t n;          // weight rows (output features)
  int64_t row_bytes;  // stored bytes per weight row
};

Shape check_weight(const char* op, const at::Tensor& w, int64_t qtype, int64_t k) {
  const QTypeKernels* t = find_kernels(qtype);
  TORCH_CHECK(t != nullptr, op, ": no CPU block kernel for GGML type ", qtype);
  TORCH_CHECK(k > 0 && k % t->block_elems == 0, op, ": k=", k, " is not a positive multiple of the ",
              t->block_elems, "-value blocks of GGML type ", qtype);
  TORCH_CHECK(k <= (int64_t{1} << 30), op, ": k=", k, " is too large");
  TORCH_CHECK(w.device().is_cpu(), op, ": w must be on the CPU, got ", w.device());
  TORCH_CHECK(w.scalar_type() == at::kByte, op, ": w must be uint8 blocks, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, op, ": w must be [N, row_bytes], got ", w.dim(), " dimensions");
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
  const int64_t row_bytes = k / t->block_elems * t->block_bytes;
  TORCH_CHECK(w.size(1) == row_bytes, op, ": w has ", w.size(1), " bytes per row; a row of k=", k,
              " values of GGML type ", qtype, " takes ", row_bytes);
  return {t, w.size(0), row_bytes};
}

void check_activations(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "block_matmul: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "block_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "block_matmul: x must be [..., k=", k, "], got ", x.sizes());
}

// The bias as a contiguous float32 [n] (a bfloat16 bias, as after module.to(bfloat16), is
// widened), or nothing.
std::optional<at::Tensor> checked_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return std::nullopt;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu() && (b.scalar_type() == at::kFloat || b.scalar_type() == at::kBFloat16) &&
                  b.dim() == 1 && b.size(0) == n,
              "block_matmul: bias must be a float32 or bfloat16 CPU tensor [", n, "], got ", b.scalar_type(), " ",
              b.sizes(), " on ", b.device());
  return b.to(at::kFloat).contiguous();
}

// ---- the two paths ----

void dequantize_rows(const QTypeKernels& t, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t k,
                     float* out) {
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / k);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) t.dequant(w + r * row_bytes, out + r * k, static_cast<int>(k));
  });
}

// How k is cut into chunks of about `blocks` x blocks (whole weight blocks).
struct KChunks {
  int64_t nb;           // x blocks per row
  int64_t chunk;        // x blocks per chunk
  int64_t chunk_bytes;  // stored weight bytes per chunk

  KChunks(const QTypeKernels& t, int64_t k, int64_t blocks = kXChunkBlocks) : nb(k / kQ8Elems) {
    const int64_t unit = t.block_elems / kQ8Elems;  // x blocks per weight block
    chunk = std::max(unit, blocks / unit * unit);
    chunk_bytes = chunk / unit * t.block_bytes;
  }
  int values(int64_t c0) const { return static_cast<int>(std::min(chunk, nb - c0) * kQ8Elems); }
};

// The portable path: out[m, j] = dot(weight row j, x row m) (+ bias[j]) for the weight rows
// [j0, j1), a row's dot the float sum, in order, of its chunks' dots (each starting from zero).
// The dots run for kRowGroup weight rows at a time, so each x block is read from L1 by every
// row of the group.
template <typename Out>
void scalar_dot_rows(const Shape& s, const uint8_t* w, const Q8Block* xq, int64_t rows, int64_t k, const float* bias,
                     int64_t j0, int64_t j1, Out* out) {
  const VecDotFn dot = s.kernels->dot_scalar;
  const KChunks kc(*s.kernels, k);
  std::vector<float> acc(static_cast<size_t>(kRowGroup * rows));  // [group row, m]
  for (int64_t g0 = j0; g0 < j1; g0 += kRowGroup) {
    const int64_t g1 = std::min(j1, g0 + kRowGroup);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t c0 = 0, c = 0; c0 < kc.nb; c0 += kc.chunk, ++c) {
      for (int64_t j = g0; j < g1; ++j) {
        const uint8_t* wj = w + j * s.row_bytes + c * kc.chunk_bytes;
        float* a = acc.data() + (j - g0) * rows;
        for (int64_t m = 0; m < rows; ++m) a[m] += dot(wj, xq + m * kc.nb + c0, kc.values(c0));
      }
    }
    for (int64_t j = g0; j < g1; ++j) {
      const float b = bias != nullptr ? bias[j] : 0.0f;
      for (int64_t m = 0; m < rows; ++m) out[m * s.n + j] = static_cast<Out>(acc[(j - g0) * rows + m] + b);
    }
  }
}

// How the SIMD path takes the x rows: rows [0, wide) in `wide_groups` groups of kWideLanes for
// the AVX-512 tile16 kernel (none without it; the last group may be padded with zero rows);
// of the rest, from `wide` on, rows [0, tiled) in `groups` groups of kLanes for the AVX2 tile
// kernel (the last one may be padded), rows [tiled, tiled + paired) as one (padded) group of
// kPairRows, the others up to kMaxWeightRowsX at a time by the weight-rows kernel.
struct RowSplit {
  int64_t wide_groups;
  int64_t wide;
  int64_t groups;
  int64_t tiled;
  int64_t paired;

  RowSplit(int64_t rows, bool wide_tiles) {
    const int64_t wide_left = rows % kWideLanes;
    wide_groups = wide_tiles ? rows / kWideLanes + (wide_left >= kMinWideRows ? 1 : 0) : 0;
    wide = std::min(rows, wide_groups * kWideLanes);
    const int64_t rest = rows - wide;
    const int64_t left = rest % kLanes;
    groups = rest / kLanes + (left >= kMinGroupRows ? 1 : 0);
    tiled = std::min(rest, groups * kLanes);
    paired = left >= kMinPairRows && left < kMinGroupRows ? std::min(left, kPairRows) : 0;
  }
};

// The activations of one product in the layouts RowSplit gives each kernel.
struct XLayouts {
  const Q8Block* blocks;  // [rows, nb]: every row (the weight-rows kernel's)
  const Q8Tile16* wide;   // [wide_groups, nb]: rows [0, wide)
  const Q8Tile* tiles;    // [groups, nb]: rows wide + [0, tiled)
  const Q8Tile4* pairs;   // [1, nb]: rows wide + tiled + [0, paired)
};

// The SIMD path for the weight rows [j0, j1) (see block_matmul): each output's chain runs over
// the k-chunks, kRowGroup weight rows sharing each chunk of x.
template <typename Out>
void simd_dot_rows(const Shape& s, const uint8_t* w, const XLayouts& x, const RowSplit& split, int64_t rows, int64_t k,
                   const float* bias, int64_t j0, int64_t j1, Out* out) {
  const QTypeKernels& t = *s.kernels;
  const DotWeightRowsFn weight_rows = weight_rows_kernel(t);
  const DotTileFn tile = tile_kernel(t);
  const DotPairTileFn pair_tile = pair_tile_kernel(t);
  // With no groups, x is a few rows: whole rows per call cost the fewest calls. Wide tiles
  // take smaller chunks (768 bytes a block and group: the up to kMaxWideGroups groups of one
  // call, 24 KiB, stay in L1; measured against 16 blocks: docs/kernels.md).
  const int64_t chunk_blocks = split.wide_groups > 0 ? kWideChunkBlocks
                               : split.groups > 0    ? kXChunkBlocks
                                                     : k / kQ8Elems;
  const KChunks kc(t, k, chunk_blocks);
  // Each weight block read prefetches the next row group's (the hardware prefetchers alone
  // leave the dots waiting on short rows; measured: docs/kernels.md).
  const int64_t ahead = kRowGroup * s.row_bytes;
  const int64_t first_tiled = split.wide;
  const int64_t first_paired = first_tiled + split.tiled;
  const int64_t first_single = first_paired + split.paired;
  const int64_t singles = rows - first_single;
  std::vector<float> wide_acc(static_cast<size_t>(kRowGroup * split.wide_groups * kWideLanes));  // [group row, m]
  std::vector<float> tile_acc(static_cast<size_t>(kRowGroup * split.groups * kLanes));  // [group row, m - first_tiled]
  std::vector<float> pair_acc(static_cast<size_t>((kRowGroup + 1) * kPairRows));  // [group row, m - first_paired]
  std::vector<float> single_acc(static_cast<size_t>(singles * kLanes));  // [m - first_single, group row]
  for (int64_t g0 = j0; g0 < j1; g0 += kRowGroup) {
    const int64_t count = std::min(j1 - g0, kRowGroup);
    std::fill(wide_acc.begin(), wide_acc.end(), 0.0f);
    std::fill(tile_acc.begin(), tile_acc.end(), 0.0f);
    std::fill(pair_acc.begin(), pair_acc.end(), 0.0f);
    std::fill(single_acc.begin(), single_acc.end(), 0.0f);
    for (int64_t c0 = 0, c = 0; c0 < kc.nb; c0 += kc.chunk, ++c) {
      const int values = kc.values(c0);
      const uint8_t* chunk = w + g0 * s.row_bytes + c * kc.chunk_bytes;
      // The x tiles of one call stay in L1 while the group's weight rows meet them.
      for (int64_t g = 0; g < split.wide_groups; g += kMaxWideGroups) {
        const int groups = static_cast<int>(std::min<int64_t>(kMaxWideGroups, split.wide_groups - g));
        for (int64_t i = 0; i < count; ++i) {
          t.dot_tile16_avx512(chunk + i * s.row_bytes, x.wide + g * kc.nb + c0, kc.nb, groups, values,
                              wide_acc.data() + (i * split.wide_groups + g) * kWideLanes, g == 0 ? ahead : 0);
        }
      }
      const bool read = split.wide_groups > 0;  // whether the weights were read (and prefetched) above
      for (int64_t g = 0; g < split.groups; g += kMaxTileGroups) {
        const int groups = static_cast<int>(std::min<int64_t>(kMaxTileGroups, split.groups - g));
        for (int64_t i = 0; i < count; ++i) {
          tile(chunk + i * s.row_bytes, x.tiles + g * kc.nb + c0, kc.nb, groups, values,
               tile_acc.data() + (i * split.groups + g) * kLanes, g == 0 && !read ? ahead : 0);
        }
      }
      if (split.paired > 0) {
        for (int64_t i = 0; i < count; i += 2) {  // a last row without a pair is paired with itself
          pair_tile(chunk + i * s.row_bytes, i + 1 < count ? s.row_bytes : 0, x.pairs + c0, values,
                    pair_acc.data() + i * kPairRows, first_paired == 0 ? ahead : 0);
        }
      }
      if (singles == 0) continue;
      const uint8_t* lanes[kLanes];  // a short group repeats its last row
      for (int64_t i = 0; i < kLanes; ++i) lanes[i] = chunk + std::min(i, count - 1) * s.row_bytes;
      for (int64_t m = first_single; m < rows; m += kMaxWeightRowsX) {
        const int x_rows = static_cast<int>(std::min<int64_t>(kMaxWeightRowsX, rows - m));
        const bool first_read = m == 0;  // the others prefetch nothing new
        weight_rows(lanes, x.blocks + m * kc.nb + c0, kc.nb, x_rows, values,
                    single_acc.data() + (m - first_single) * kLanes, first_read ? ahead : 0);
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      const float b = bias != nullptr ? bias[g0 + i] : 0.0f;
      for (int64_t m = 0; m < rows; ++m) {
        const float acc = m < first_tiled    ? wide_acc[(i * split.wide_groups) * kWideLanes + m]
                          : m < first_paired ? tile_acc[(i * split.groups) * kLanes + m - first_tiled]
                          : m < first_single ? pair_acc[i * kPairRows + m - first_paired]
                                             : single_acc[(m - first_single) * kLanes + i];
        out[m * s.n + g0 + i] = static_cast<Out>(acc + b);
      }
    }
  }
}

template <typename Out>
void vec_dot_matmul(const Shape& s, const uint8_t* w, const Q8Block* xq, int64_t rows, int64_t k, const float* bias,
                    Out* out) {
  // Threads take whole groups of kRowGroup weight rows.
  const int64_t row_groups = (s.n + kRowGroup - 1) / kRowGroup;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (k * rows * kRowGroup));
  if (!use_avx2(*s.kernels)) {
    at::parallel_for(0, row_groups, grain, [&](int64_t g0, int64_t g1) {
      scalar_dot_rows(s, w, xq, rows, k, bias, g0 * kRowGroup, std::min(s.n, g1 * kRowGroup), out);
    });
    return;
  }
  const RowSplit split(rows, use_avx512(*s.kernels));
  const int64_t nb = k / kQ8Elems;
  thread_local std::vector<Q8Tile16> wide_tiles;
  thread_local std::vector<Q8Tile> tiles;
  thread_local std::vector<Q8Tile4> pair_tiles;
  XLayouts x{xq, nullptr, nullptr, nullptr};
  x.wide = tile_activations(xq, split.wide, nb, kWideLanes, wide_tiles);
  x.tiles = tile_activations(xq + split.wide * nb, split.tiled, nb, kLanes, tiles);
  x.pairs = tile_activations(xq + (split.wide + split.tiled) * nb, split.paired, nb, kPairRows, pair_tiles);
  at::parallel_for(0, row_groups, grain, [&](int64_t g0, int64_t g1) {
    simd_dot_rows(s, w, x, split, rows, k, bias, g0 * kRowGroup, std::min(s.n, g1 * kRowGroup), out);
  });
}

}  // namespace

// ---- ops ----

at::Tensor block_matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k,
                        const std::optional<at::Tensor>& bias_in) {
  const Shape s = check_weight("block_matmul", w, qtype, k);
  check_activations(x_in, k);
  const std::optional<at::Tensor> bias = checked_bias(bias_in, s.n);
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = s.n;
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();  // [M, k]
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty(out_sizes, x.options());  // [..., N] in x's dtype
  if (rows == 0 || s.n == 0) return out;
  const uint8_t* wp = w.data_ptr<uint8_t>();

  const Q8Block* xq = quantize_activations(x, k);
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    vec_dot_matmul(s, wp, xq, rows, k, bp, out.data_ptr<float>());
  } else {
    vec_dot_matmul(s, wp, xq, rows, k, bp, out.data_ptr<at::BFloat16>());
  }
  return out;
}

// ---- Mixture-of-Experts: every active expert's product in one call ----

// The rows of one expert: x rows [m0, m0 + rows) against expert e's weights, their layouts as
// vec_dot_matmul makes them for a product of `rows` rows.
struct ExpertGroup {
  int64_t e;
  int64_t m0;
  int64_t rows;
  RowSplit split;
  XLayouts x;
  int64_t units_begin;  // the group's first work unit (kRowGroup weight rows each)
};

template <typename Out>
void expert_dot_matmul(const Shape& s, const uint8_t* w, int64_t expert_bytes, const Q8Block* xq,
                       const std::vector<int64_t>& counts, int64_t k, Out* out) {
  const int64_t nb = k / kQ8Elems;
  const int64_t row_groups = (s.n + kRowGroup - 1) / kRowGroup;
  const bool simd = use_avx2(*s.kernels);
  const bool wide = use_avx512(*s.kernels);
  std::vector<ExpertGroup> groups;
  // Each group's tiles live in their own buffers (vec_dot_matmul's are one per thread).
  std::vector<std::vector<Q8Tile16>> wide_tiles;
  std::vector<std::vector<Q8Tile>> tiles;
  std::vector<std::vector<Q8Tile4>> pair_tiles;
  int64_t m0 = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    const int64_t rows = counts[e];
    if (rows == 0) continue;
    const Q8Block* xg = xq + m0 * nb;
    ExpertGroup g{e, m0, rows, RowSplit(rows, simd && wide), XLayouts{xg, nullptr, nullptr, nullptr},
                  static_cast<int64_t>(groups.size()) * row_groups};
    if (simd) {
      wide_tiles.emplace_back();
      tiles.emplace_back();
      pair_tiles.emplace_back();
      g.x.wide = tile_activations(xg, g.split.wide, nb, kWideLanes, wide_tiles.back());
      g.x.tiles = tile_activations(xg + g.split.wide * nb, g.split.tiled, nb, kLanes, tiles.back());
      g.x.pairs = tile_activations(xg + (g.split.wide + g.split.tiled) * nb, g.split.paired, nb, kPairRows,
                                   pair_tiles.back());
    }
    groups.push_back(g);
    m0 += rows;
  }
  const int64_t units = static_cast<int64_t>(groups.size()) * row_groups;
  // The grain of the product of the median group's rows; whole groups' units share threads.
  const int64_t typical_rows = std::max<int64_t>(1, m0 / std::max<int64_t>(1, static_cast<int64_t>(groups.size())));
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (k * typical_rows * kRowGroup));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      const ExpertGroup& g = groups[static_cast<size_t>(u / row_groups)];
      const int64_t first = u - g.units_begin;
      const int64_t last = std::min(row_groups, first + (u1 - u));  // this group's units in [u, u1)
      const uint8_t* wg = w + g.e * expert_bytes;
      const int64_t j0 = first * kRowGroup;
      const int64_t j1 = std::min(s.n, last * kRowGroup);
      Out* og = out + g.m0 * s.n;
      if (simd) {
        simd_dot_rows(s, wg, g.x, g.split, g.rows, k, nullptr, j0, j1, og);
      } else {
        scalar_dot_rows(s, wg, g.x.blocks, g.rows, k, nullptr, j0, j1, og);
      }
      u += last - first;
    }
  });
}

// experts_matmul(x [M, k], w [E, N, row_bytes], counts [E]) = for each expert e, the x rows
// routed to it (x sorted by expert: counts[e] rows each, in expert order) @ dequant(w[e]).T;
// [M, N]. Every row's result is the bits block_matmul(those rows, w[e]) gives; the experts'
// products share one split of the weight rows between threads.
at::Tensor experts_matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k,
                          const at::Tensor& counts_in) {
  TORCH_CHECK(w.dim() == 3 && w.size(0) > 0 && w.is_contiguous(),
              "experts_matmul: w must be contiguous [n_expert > 0, N, row_bytes], got ", w.sizes());
  const Shape s = check_weight("experts_matmul", w.select(0, 0), qtype, k);
  check_activations(x_in, k);
  TORCH_CHECK(x_in.dim() == 2, "experts_matmul: x must be [M, k], got ", x_in.sizes());
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == w.size(0),
              "experts_matmul: counts must be [n_expert=", w.size(0), "], got ", counts_in.sizes());
  const at::Tensor c = counts_in.to(at::kLong).contiguous();
  const std::vector<int64_t> counts(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  int64_t total = 0;
  for (const int64_t n : counts) {
    TORCH_CHECK(n >= 0, "experts_matmul: a negative count ", n);
    total += n;
  }
  TORCH_CHECK(total == x_in.size(0), "experts_matmul: counts sum to ", total, ", x has ", x_in.size(0), " rows");
  const at::Tensor x = x_in.contiguous();  // [M, k]
  at::Tensor out = at::empty({x.size(0), s.n}, x.options());  // [M, N] in x's dtype
  if (total == 0 || s.n == 0) return out;
  const Q8Block* xq = quantize_activations(x, k);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t expert_bytes = s.n * s.row_bytes;
  if (x.scalar_type() == at::kFloat) {
    expert_dot_matmul(s, wp, expert_bytes, xq, counts, k, out.data_ptr<float>());
  } else {
    expert_dot_matmul(s, wp, expert_bytes, xq, counts, k, out.data_ptr<at::BFloat16>());
  }
  return out;
}

at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t k) {
  const Shape s = check_weight("dequantize", w, qtype, k);
  at::Tensor out = at::empty({s.n, k}, w.options().dtype(at::kFloat));  // [N, k]
  if (s.n > 0) dequantize_rows(*s.kernels, w.data_ptr<uint8_t>(), s.row_bytes, s.n, k, out.data_ptr<float>());
  return out;
}

std::vector<int64_t> qtypes() {
  std::vector<int64_t> types;
  for (int i = 0; i < kLegacyKernelCount; ++i) types.push_back(kLegacyKernels[i].ggml_type);
  for (int i = 0; i < kKQuantKernelCount; ++i) types.push_back(kKQuantKernels[i].ggml_type);
  for (int i = 0; i < kLowBitKernelCount; ++i) types.push_back(kLowBitKernels[i].ggml_type);
  return types;
}

}  // namespace ppinfer

TORCH_LIBRARY(ppinfer_kernels, m) {
  m.def("block_matmul(Tensor x, Tensor w, int qtype, int k, Tensor? bias=None) -> Tensor", &ppinfer::block_matmul);
  m.def("dequantize(Tensor w, int qtype, int k) -> Tensor", &ppinfer::dequantize);
  m.def("experts_matmul(Tensor x, Tensor w, int qtype, int k, Tensor counts) -> Tensor", &ppinfer::experts_matmul);
  m.def("qtypes() -> int[]", &ppinfer::qtypes);
}
