// Activations for the block kernels (ops.cpp): float rows quantized to Q8Blocks, and Q8Blocks
// interleaved into the tiles of the tile kernels (qtypes.h: Q8Tile, Q8Tile4, Q8Tile16).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "qtypes.h"

namespace ppinfer {

// Values below which quantizing or tiling is not split further between threads.
constexpr int64_t kQuantizeGrain = int64_t{1} << 15;

// ---- activation quantization: 32 floats -> Q8Block (d = max|x| / 127, q = round(x / d)) ----

inline void quantize_row_scalar(const float* x, Q8Block* out, int64_t k) {
  for (int64_t b = 0; b < k / kQ8Elems; ++b, x += kQ8Elems) {
    float amax = 0.0f;
    for (int j = 0; j < kQ8Elems; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < kQ8Elems; ++j) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(x[j] * id));
      out[b].q[j] = static_cast<int8_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

#ifdef PPINFER_X86
// The same blocks as quantize_row_scalar (same products, same round-to-nearest-even).
PPINFER_AVX2 inline void quantize_row_avx2(const float* x, Q8Block* out, int64_t k) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / kQ8Elems; ++b, x += kQ8Elems) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // int32 -> int8 with packs, which interleave 128-bit lanes; the permute restores order.
    const __m256i q01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i q23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q), bytes);
    const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    out[b].d = d;
    out[b].s = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}
#endif

inline void quantize_row(const float* x, Q8Block* out, int64_t k) {
#ifdef PPINFER_X86
  if (active_isa() >= Isa::kAvx2) {
    quantize_row_avx2(x, out, k);
    return;
  }
#endif
  quantize_row_scalar(x, out, k);
}

// All rows of x ([M, k], float32 or bfloat16) as Q8Blocks, into a buffer reused by the thread;
// torch's threads split the rows (each row's blocks are the same however they are split).
inline const Q8Block* quantize_activations(const at::Tensor& x, int64_t k) {
  thread_local std::vector<Q8Block> blocks;
  const int64_t rows = x.size(0);
  const int64_t nb = k / kQ8Elems;
  blocks.resize(static_cast<size_t>(rows * nb));
  Q8Block* out = blocks.data();
  const int64_t grain = std::max<int64_t>(1, kQuantizeGrain / k);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * k, out + m * nb, k);
    });
  } else {
    const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
    at::parallel_for(0, rows, grain, [&](int64_t m0, int64_t m1) {
      std::vector<float> row(static_cast<size_t>(k));
      for (int64_t m = m0; m < m1; ++m) {
        std::copy(xp + m * k, xp + (m + 1) * k, row.begin());
        quantize_row(row.data(), out + m * nb, k);
      }
    });
  }
  return out;
}

// x's sums of q over values 0..15 and 16..31 into lane r of a tile.
inline void set_half_sums(Q8Tile& t, int64_t r, int32_t lo, int32_t hi) {
  t.half_sums[r][0] = static_cast<int16_t>(lo);
  t.half_sums[r][1] = static_cast<int16_t>(hi);
}
inline void set_half_sums(Q8Tile4& t, int64_t r, int32_t lo, int32_t hi) {
  t.half_sums[r][0] = static_cast<int16_t>(lo);
  t.half_sums[r][1] = static_cast<int16_t>(hi);
}
inline void set_half_sums(Q8Tile16& t, int64_t r, int32_t lo, int32_t hi) {
  t.half_sums[0][r] = lo;
  t.half_sums[1][r] = hi;
}

// Lane r of tile t: activation block x.
template <class XTile>
void set_lane(XTile& t, int64_t r, const Q8Block& x) {
  for (int i = 0; i < kQ8Elems / 4; ++i) std::memcpy(t.q[i][r], x.q + 4 * i, 4);
  t.d[r] = x.d;
  t.s[r] = x.s;
  int32_t lo = 0, hi = 0;
  for (int i = 0; i < kQ8Elems / 2; ++i) {
    lo += x.q[i];
    hi += x.q[i + kQ8Elems / 2];
  }
  set_half_sums(t, r, lo, hi);
}

// `rows` rows of xq ([rows, nb] blocks) as tiles of `lanes` rows each, [ceil(rows / lanes), nb],
// in `tiles` (resized; padding lanes are zero); torch's threads split the tiles.
template <class XTile>
const XTile* tile_activations(const Q8Block* xq, int64_t rows, int64_t nb, int64_t lanes, std::vector<XTile>& tiles) {
  const int64_t groups = (rows + lanes - 1) / lanes;
  tiles.resize(static_cast<size_t>(groups * nb));
  XTile* out = tiles.data();
  at::parallel_for(0, groups, std::max<int64_t>(1, kQuantizeGrain / (nb * kQ8Elems * lanes)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(out + g * nb, out + (g + 1) * nb, XTile{});
      for (int64_t m = g * lanes; m < std::min(rows, (g + 1) * lanes); ++m) {
        for (int64_t b = 0; b < nb; ++b) set_lane(out[g * nb + b], m % lanes, xq[m * nb + b]);
      }
    }
  });
  return out;
}

}  // namespace ppinfer
