// float_matmul(x [..., k], w [n, k], bias) = x @ w.T + bias in float32 (namespace ppinfer_kernels),
// for the float weights of a quantized stage (MoE routers, a DeepSeek file's decompression
// assembled from attn_k_b and attn_v_b, F16 or F32 tensors, types without a block kernel).
//
// A float GEMM (MKL, oneDNN) blocks its work by the number of rows, so a row's rounding depends
// on the rows beside it. Here every output is one fixed chain: eight lanes, lane l summing
// x[8i + l] * w[8i + l] for i in order, then the lanes by one tree, then the k % 8 tail in order,
// then the bias; tiles of rows and outputs only decide which chains run side by side. A row's
// result is therefore the same bits alone or among any others, like the block products'.
// The AVX2 path (FMA) runs where the block kernels run AVX2; the portable one elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "ops.h"
#include "qtypes.h"

#ifdef PPINFER_X86
#include <immintrin.h>
#endif

namespace ppinfer {
namespace {

constexpr int kTileRows = 4;     // x rows a tile
constexpr int kTileOutputs = 3;  // outputs a tile (4 x 3 accumulators and the loads fit 16 registers)
constexpr int64_t kTaskOutputs = 48;  // outputs a thread's task takes at a time

// The fixed tree over eight lanes.
inline float tree8(const float* l) { return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])); }

// One output's chain after its lanes: the tree, the tail in order, the bias.
inline float finish(const float* lanes, const float* x, const float* w, int64_t k8, int64_t k, float bias) {
  float s = tree8(lanes);
  for (int64_t i = k8; i < k; ++i) s += x[i] * w[i];
  return s + bias;
}

// out[m, j] for rows [m0, m1) and outputs [j0, j1): portable lanes (the compiler vectorizes them).
void tile_scalar(const float* x, const float* w, const float* bias, float* out, int64_t k, int64_t n, int64_t m0,
                 int64_t m1, int64_t j0, int64_t j1) {
  const int64_t k8 = k / 8 * 8;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xm = x + m * k;
    for (int64_t j = j0; j < j1; ++j) {
      const float* wj = w + j * k;
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < k8; i += 8) {
        for (int l = 0; l < 8; ++l) lanes[l] += xm[i + l] * wj[i + l];
      }
      out[m * n + j] = finish(lanes, xm, wj, k8, k, bias != nullptr ? bias[j] : 0.0f);
    }
  }
}

#ifdef PPINFER_X86
// kR rows x kO outputs of eight-lane FMA chains.
template <int kR, int kO>
PPINFER_AVX2 void tile_avx2_fixed(const float* x, const float* w, const float* bias, float* out, int64_t k,
                                  int64_t n, int64_t m, int64_t j) {
  const int64_t k8 = k / 8 * 8;
  __m256 acc[kR][kO];
  for (int r = 0; r < kR; ++r) {
    for (int o = 0; o < kO; ++o) acc[r][o] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < k8; i += 8) {
    __m256 wv[kO];
    for (int o = 0; o < kO; ++o) wv[o] = _mm256_loadu_ps(w + (j + o) * k + i);
    for (int r = 0; r < kR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + (m + r) * k + i);
      for (int o = 0; o < kO; ++o) acc[r][o] = _mm256_fmadd_ps(xv, wv[o], acc[r][o]);
    }
  }
  alignas(32) float lanes[8];
  for (int r = 0; r < kR; ++r) {
    for (int o = 0; o < kO; ++o) {
      _mm256_store_ps(lanes, acc[r][o]);
      out[(m + r) * n + j + o] =
          finish(lanes, x + (m + r) * k, w + (j + o) * k, k8, k, bias != nullptr ? bias[j + o] : 0.0f);
    }
  }
}

PPINFER_AVX2 void tile_avx2(const float* x, const float* w, const float* bias, float* out, int64_t k, int64_t n,
                            int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
  int64_t m = m0;
  for (; m + kTileRows <= m1; m += kTileRows) {
    int64_t j = j0;
    for (; j + kTileOutputs <= j1; j += kTileOutputs) {
      tile_avx2_fixed<kTileRows, kTileOutputs>(x, w, bias, out, k, n, m, j);
    }
    for (; j < j1; ++j) tile_avx2_fixed<kTileRows, 1>(x, w, bias, out, k, n, m, j);
  }
  for (; m < m1; ++m) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile_avx2_fixed<1, 4>(x, w, bias, out, k, n, m, j);
    for (; j < j1; ++j) tile_avx2_fixed<1, 1>(x, w, bias, out, k, n, m, j);
  }
}
#endif

}  // namespace

at::Tensor float_matmul(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 1,
              "float_matmul: x must be a float32 CPU tensor [..., k], got ", x_in.scalar_type(), " on ", x_in.device());
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == at::kFloat && w_in.dim() == 2 &&
                  w_in.size(1) == x_in.size(-1),
              "float_matmul: w must be float32 [n, k=", x_in.size(-1), "], got ", w_in.scalar_type(), " ",
              w_in.sizes());
  const int64_t k = w_in.size(1), n = w_in.size(0);
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == n,
                "float_matmul: bias must be float32 [", n, "], got ", bias.scalar_type(), " ", bias.sizes());
  }
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();  // [M, k]
  const at::Tensor w = w_in.contiguous();
  const int64_t rows = x.size(0);
  std::vector<int64_t> sizes(x_in.sizes().begin(), x_in.sizes().end());
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, x.options());  // [..., n]
  if (rows == 0 || n == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
#ifdef PPINFER_X86
  const auto tile = avx2_active() ? tile_avx2 : tile_scalar;
#else
  const auto tile = tile_scalar;
#endif
  // Tasks: blocks of 64 rows times blocks of kTaskOutputs outputs.
  const int64_t row_blocks = (rows + 63) / 64, out_blocks = (n + kTaskOutputs - 1) / kTaskOutputs;
  at::parallel_for(0, row_blocks * out_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t / out_blocks, ob = t % out_blocks;
      tile(xp, wp, bp, op, k, n, rb * 64, std::min(rows, rb * 64 + 64), ob * kTaskOutputs,
           std::min(n, ob * kTaskOutputs + kTaskOutputs));
    }
  });
  return out;
}

}  // namespace ppinfer

TORCH_LIBRARY_FRAGMENT(ppinfer_kernels, m) {
  m.def("float_matmul(Tensor x, Tensor w, Tensor? bias=None) -> Tensor", &ppinfer::float_matmul);
}
