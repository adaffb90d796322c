// K-quant block kernels: Q4_K, Q5_K and Q6_K rows against Q8Block activations.
//
// A K-quant super-block holds 256 values, so it spans 8 activation blocks of 32; every sum
// below is split at those 32-value boundaries, where the activation scale changes.
//
// Stored layouts (ggml's block_q4_K / block_q5_K / block_q6_K, little-endian):
//   Q4_K (144 bytes): fp16 d | fp16 dmin | 12 bytes of 6-bit scales and mins | 128 bytes qs
//   Q5_K (176 bytes): fp16 d | fp16 dmin | 12 bytes of 6-bit scales and mins | 32 bytes qh
//                     | 128 bytes qs
//   Q6_K (210 bytes): 128 bytes ql | 64 bytes qh | 16 int8 scales | fp16 d
// Q4_K / Q5_K: sub-block j (32 values) is w = d*sc[j]*q - dmin*m[j]; qs byte 32*(j/2) + l holds
// q's low four bits in its low nibble for even j, its high nibble for odd j; Q5_K's fifth bit
// is bit j of qh[l]. Q6_K: sub-block j (16 values) is w = d*sc[j]*(q - 32); within each half
// of 128 values, 32-value group t takes its low nibbles from ql[32*(t%2) + l] (high nibbles
// for t >= 2) and its top two bits from bits 2t, 2t+1 of qh[l].
#include <cstdint>
#include <cstring>

#include "qtypes.h"


namespace ppinfer {
namespace {

constexpr int kQ4KType = 12;  // GGMLQuantizationType values
constexpr int kQ5KType = 13;
constexpr int kQ6KType = 14;
constexpr int kSuperElems = 256;
constexpr int kActPerSuper = kSuperElems / kQ8Elems;  // activation blocks per super-block: 8
constexpr int kQ4KBytes = 144;
constexpr int kQ5KBytes = 176;
constexpr int kQ6KBytes = 210;

// Offsets inside one stored block.
constexpr int kKScalesAt = 4;   // Q4_K / Q5_K: 12 bytes of packed 6-bit scales and mins
constexpr int kQ4KQsAt = 16;    // Q4_K: 128 bytes of nibbles
constexpr int kQ5KQhAt = 16;    // Q5_K: 32 bytes of fifth bits
constexpr int kQ5KQsAt = 48;    // Q5_K: 128 bytes of nibbles
constexpr int kQ6KQhAt = 128;   // Q6_K: 64 bytes of top bit pairs
constexpr int kQ6KScAt = 192;   // Q6_K: 16 int8 scales
constexpr int kQ6KDAt = 208;    // Q6_K: fp16 d

// The 8 six-bit scales and 8 six-bit mins of a Q4_K / Q5_K super-block, one byte each.
// Bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 mins 0-3; the top two bits of
// bytes 0-3 / 4-7 are bits 4-5 of scales / mins 4-7, whose bits 0-3 are the low / high
// nibbles of bytes 8-11.
struct ScaleMin {
  uint8_t sc[8];
  uint8_t m[8];
};

inline ScaleMin unpack_scale_min(const uint8_t* packed) {
  uint32_t lo, mid, hi;  // bytes 0-3, 4-7, 8-11
  std::memcpy(&lo, packed, 4);
  std::memcpy(&mid, packed + 4, 4);
  std::memcpy(&hi, packed + 8, 4);
  const uint32_t six = 0x3f3f3f3fu, four = 0x0f0f0f0fu, two = 0x03030303u;
  const uint32_t sc03 = lo & six;
  const uint32_t m03 = mid & six;
  const uint32_t sc47 = (hi & four) | (((lo >> 6) & two) << 4);
  const uint32_t m47 = ((hi >> 4) & four) | (((mid >> 6) & two) << 4);
  ScaleMin out;
  std::memcpy(out.sc, &sc03, 4);
  std::memcpy(out.sc + 4, &sc47, 4);
  std::memcpy(out.m, &m03, 4);
  std::memcpy(out.m + 4, &m47, 4);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Portable scalar kernels: the reference for the SIMD ones.

// The codes of Q4_K / Q5_K sub-block j (32 values, 0..15 / 0..31); `qh` is nullptr for Q4_K.
// Written as loops over 32 contiguous bytes with loop-invariant shifts, so they vectorize.
inline void k_sub_block_codes(const uint8_t* qs, const uint8_t* qh, int j, uint8_t* q) {
  const uint8_t* nibbles = qs + 32 * (j / 2);
  const int shift = 4 * (j % 2);
  for (int l = 0; l < kQ8Elems; ++l) q[l] = (nibbles[l] >> shift) & 0x0f;
  if (qh != nullptr) {
    for (int l = 0; l < kQ8Elems; ++l) q[l] |= ((qh[l] >> j) & 1) << 4;
  }
}

// The codes minus 32 of Q6_K activation block b (values 32b .. 32b+31 of the super-block).
inline void q6_block_codes(const uint8_t* blk, int b, int8_t* q) {
  const int half = b / 4, group = b % 4;
  const uint8_t* low = blk + 64 * half + 32 * (group % 2);
  const uint8_t* top = blk + kQ6KQhAt + 32 * half;
  const int low_shift = 4 * (group / 2), top_shift = 2 * group;
  for (int l = 0; l < kQ8Elems; ++l) {
    const int code = ((low[l] >> low_shift) & 0x0f) | (((top[l] >> top_shift) & 0x03) << 4);
    q[l] = static_cast<int8_t>(code - 32);
  }
}

// Q4_K and Q5_K share everything but the fifth bit.
inline float dot_k_scale_min(const uint8_t* blk, const uint8_t* qs, const uint8_t* qh,
                             const Q8Block* x) {
  const ScaleMin sm = unpack_scale_min(blk + kKScalesAt);
  float scaled = 0.0f;  // sum_j sc[j] * x_j.d * isum_j
  float mins = 0.0f;    // sum_j m[j] * x_j.s
  for (int j = 0; j < kActPerSuper; ++j) {
    uint8_t q[kQ8Elems];
    k_sub_block_codes(qs, qh, j, q);
    int32_t isum = 0;
    for (int l = 0; l < kQ8Elems; ++l) isum += q[l] * x[j].q[l];
    scaled += static_cast<float>(sm.sc[j]) * x[j].d * static_cast<float>(isum);
    mins += static_cast<float>(sm.m[j]) * x[j].s;
  }
  return load_fp16(blk) * scaled - load_fp16(blk + 2) * mins;
}

float dot_q4_k_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  for (int i = 0; i < k / kSuperElems; ++i) {
    const uint8_t* blk = w + i * kQ4KBytes;
    sum += dot_k_scale_min(blk, blk + kQ4KQsAt, nullptr, x + i * kActPerSuper);
  }
  return sum;
}

float dot_q5_k_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  for (int i = 0; i < k / kSuperElems; ++i) {
    const uint8_t* blk = w + i * kQ5KBytes;
    sum += dot_k_scale_min(blk, blk + kQ5KQsAt, blk + kQ5KQhAt, x + i * kActPerSuper);
  }
  return sum;
}

float dot_q6_k_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  for (int i = 0; i < k / kSuperElems; ++i) {
    const uint8_t* blk = w + i * kQ6KBytes;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + kQ6KScAt);
    const Q8Block* xs = x + i * kActPerSuper;
    float block_sum = 0.0f;
    for (int b = 0; b < kActPerSuper; ++b) {
      int8_t q[kQ8Elems];
      q6_block_codes(blk, b, q);
      int32_t scaled = 0;
      for (int half = 0; half < 2; ++half) {  // the two 16-value sub-blocks of activation block b
        int32_t isum = 0;
        for (int l = 16 * half; l < 16 * half + 16; ++l) isum += q[l] * xs[b].q[l];
        scaled += sc[2 * b + half] * isum;
      }
      block_sum += xs[b].d * static_cast<float>(scaled);
    }
    sum += load_fp16(blk + kQ6KDAt) * block_sum;
  }
  return sum;
}

// Dequantization, float for float as gguf-py computes it: (d * sc) * q - (dmin * m).
inline void dequant_k_scale_min(const uint8_t* blk, const uint8_t* qs, const uint8_t* qh,
                                float* out) {
  const ScaleMin sm = unpack_scale_min(blk + kKScalesAt);
  const float d = load_fp16(blk), dmin = load_fp16(blk + 2);
  for (int j = 0; j < kActPerSuper; ++j) {
    const float scale = d * static_cast<float>(sm.sc[j]);
    const float offset = dmin * static_cast<float>(sm.m[j]);
    uint8_t q[kQ8Elems];
    k_sub_block_codes(qs, qh, j, q);
    for (int l = 0; l < kQ8Elems; ++l) out[32 * j + l] = scale * static_cast<float>(q[l]) - offset;
  }
}

void dequant_q4_k(const uint8_t* w, float* out, int k) {
  for (int i = 0; i < k / kSuperElems; ++i) {
    const uint8_t* blk = w + i * kQ4KBytes;
    dequant_k_scale_min(blk, blk + kQ4KQsAt, nullptr, out + i * kSuperElems);
  }
}

void dequant_q5_k(const uint8_t* w, float* out, int k) {
  for (int i = 0; i < k / kSuperElems; ++i) {
    const uint8_t* blk = w + i * kQ5KBytes;
    dequant_k_scale_min(blk, blk + kQ5KQsAt, blk + kQ5KQhAt, out + i * kSuperElems);
  }
}

// (d * sc) * (q - 32), as gguf-py computes it.
void dequant_q6_k(const uint8_t* w, float* out, int k) {
  for (int i = 0; i < k / kSuperElems; ++i) {
    const uint8_t* blk = w + i * kQ6KBytes;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + kQ6KScAt);
    const float d = load_fp16(blk + kQ6KDAt);
    for (int b = 0; b < kActPerSuper; ++b) {
      int8_t q[kQ8Elems];
      q6_block_codes(blk, b, q);
      float* o = out + i * kSuperElems + 32 * b;
      for (int half = 0; half < 2; ++half) {
        const float scale = d * static_cast<float>(sc[2 * b + half]);
        for (int l = 16 * half; l < 16 * half + 16; ++l) o[l] = scale * static_cast<float>(q[l]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 kernels. Each activation block's integer sum becomes 8 int32 lanes, is converted to
// float once and scaled by that block's d; the weight's fp16 d is applied once per super-block.
// They take one weight row against 1 to kMaxDotRows activation rows, decoding each super-block
// once for all of them.

#if defined(PPINFER_X86)

PPINFER_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PPINFER_AVX2 inline __m256i load256(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

// acc += float(int32 lanes) * x.d
PPINFER_AVX2 inline __m256 fma_block(__m256i isum, const Q8Block& x, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(&x.d), acc);
}

// [x[0].s, ..., x[7].s]: the 8 activation sums of one super-block.
PPINFER_AVX2 inline __m256 act_sums(const Q8Block* x) {
  return _mm256_setr_ps(x[0].s, x[1].s, x[2].s, x[3].s, x[4].s, x[5].s, x[6].s, x[7].s);
}

// Byte shuffle tables, built at compile time (loading a pattern is cheaper than building it).
template <int kCount>
struct alignas(32) Picks {
  uint8_t pick[kCount][32];
};

// Q4_K / Q5_K: pick[j] broadcasts int16 lane j of each 128-bit lane (scale j) to all 16 lanes.
constexpr Picks<8> make_scale_picks() {
  Picks<8> t{};
  for (int j = 0; j < 8; ++j) {
    for (int l = 0; l < 32; ++l) t.pick[j][l] = static_cast<uint8_t>(2 * j + l % 2);
  }
  return t;
}
constexpr Picks<8> kScalePicks = make_scale_picks();

// Q6_K: pick[t] puts int16 lane 2t of each 128-bit lane in lanes 0-7 and lane 2t+1 in lanes
// 8-15, i.e. the scales of the two 16-value halves of one activation block.
constexpr Picks<4> make_q6_scale_picks() {
  Picks<4> t{};
  for (int g = 0; g < 4; ++g) {
    for (int l = 0; l < 32; ++l) t.pick[g][l] = static_cast<uint8_t>(2 * (2 * g + l / 16) + l % 2);
  }
  return t;
}
constexpr Picks<4> kQ6ScalePicks = make_q6_scale_picks();

// Q4_K / Q5_K scales and mins from the 12 packed bytes, in vector form (unpack_scale_min's
// arithmetic on the dwords lo, mid, hi, twice over, once per 128-bit lane).
struct ScaleMinAvx2 {
  __m256i sc16;  // int16 lanes 0-7 of each 128-bit lane: sc[0..7]
  __m256 mins;   // float lanes 0-7: m[0..7]
};

PPINFER_AVX2 inline ScaleMinAvx2 unpack_scale_min_avx2(const uint8_t* packed) {
  const __m256i six = _mm256_set1_epi8(0x3f), four = _mm256_set1_epi8(0x0f);
  const __m256i bits45 = _mm256_set1_epi8(0x30);
  // The 16 bytes from `packed` (the last 4 are the block's first codes, unused) in both lanes.
  const __m256i u = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  const __m256i lo_mid = _mm256_shuffle_epi32(u, 0x44);  // dwords [lo, mid, lo, mid]
  const __m256i hi_hi = _mm256_shuffle_epi32(u, 0xa4);   // dwords [., ., hi, hi]
  const __m256i low_nibbles = _mm256_and_si256(_mm256_srlv_epi32(hi_hi, _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4)), four);
  const __m256i top_bits = _mm256_and_si256(_mm256_srli_epi32(lo_mid, 2), bits45);
  // bytes [sc0-3, m0-3, sc4-7, m4-7] in each lane
  const __m256i all = _mm256_blend_epi32(_mm256_and_si256(lo_mid, six), _mm256_or_si256(low_nibbles, top_bits), 0xcc);
  const __m256i pick_sc = _mm256_setr_epi8(0, -1, 1, -1, 2, -1, 3, -1, 8, -1, 9, -1, 10, -1, 11, -1,
                                           0, -1, 1, -1, 2, -1, 3, -1, 8, -1, 9, -1, 10, -1, 11, -1);
  const __m256i pick_m = _mm256_setr_epi8(4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1,
                                          12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
  return {_mm256_shuffle_epi8(all, pick_sc), _mm256_cvtepi32_ps(_mm256_shuffle_epi8(all, pick_m))};
}

// madd(maddubs(q, x.q), sc): 8 int32 lanes summing to sc * sum_l q[l] * x.q[l], `sc` being one
// scale in all 16 int16 lanes.
PPINFER_AVX2 inline __m256i scaled_isum(__m256i q, const Q8Block& x, __m256i sc) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, load256(x.q)), sc);
}

// Q4_K and Q5_K (kFifthBit), one weight row against kRows activation rows (row r's blocks
// start at x + r * x_stride): each super-block is decoded once for all rows.
template <bool kFifthBit, int kRows>
PPINFER_AVX2 inline void dot_k_scale_min_avx2(const uint8_t* w, const Q8Block* x, int64_t x_stride,
                                              int k, float* out) {
  constexpr int kBlockBytes = kFifthBit ? kQ5KBytes : kQ4KBytes;
  constexpr int kQsAt = kFifthBit ? kQ5KQsAt : kQ4KQsAt;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int i = 0; i < k / kSuperElems; ++i, w += kBlockBytes) {
    const Q8Block* xs = x + i * kActPerSuper;
    const ScaleMinAvx2 sm = unpack_scale_min_avx2(w + kKScalesAt);
    __m256i qh = kFifthBit ? load256(w + kQ5KQhAt) : _mm256_setzero_si256();
    // Per row, two independent chains (the FMA latency would bound one), each summed in the
    // same order for any kRows: a row's result does not depend on the rows beside it.
    __m256 sums[kRows][2];
    for (auto& row_sums : sums) row_sums[0] = row_sums[1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int g = 0; g < kActPerSuper / 2; ++g) {
      const __m256i packed = load256(w + kQsAt + 32 * g);
      __m256i q_even = _mm256_and_si256(packed, low4);
      __m256i q_odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
      if constexpr (kFifthBit) {  // bits 2g and 2g+1 of qh, moved to bit 4
        q_even = _mm256_or_si256(q_even, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4));
        q_odd = _mm256_or_si256(q_odd, _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4));
        qh = _mm256_srli_epi16(qh, 2);
      }
      const __m256i sc_even = _mm256_shuffle_epi8(sm.sc16, load256(kScalePicks.pick[2 * g]));
      const __m256i sc_odd = _mm256_shuffle_epi8(sm.sc16, load256(kScalePicks.pick[2 * g + 1]));
      for (int r = 0; r < kRows; ++r) {
        const Q8Block* xr = xs + r * x_stride;
        sums[r][0] = fma_block(scaled_isum(q_even, xr[2 * g], sc_even), xr[2 * g], sums[r][0]);
        sums[r][1] = fma_block(scaled_isum(q_odd, xr[2 * g + 1], sc_odd), xr[2 * g + 1], sums[r][1]);
      }
    }
    // fp16 d and dmin, converted together: [d, dmin, d, dmin, ...]
    int32_t d_dmin_bits;
    std::memcpy(&d_dmin_bits, w, sizeof d_dmin_bits);
    const __m256 d_dmin = _mm256_cvtph_ps(_mm_set1_epi32(d_dmin_bits));
    const __m256 d = _mm256_moveldup_ps(d_dmin);
    const __m256 dmin_m = _mm256_mul_ps(_mm256_movehdup_ps(d_dmin), sm.mins);  // dmin * m[j]
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm256_fmadd_ps(d, _mm256_add_ps(sums[r][0], sums[r][1]), acc[r]);
      acc[r] = _mm256_fnmadd_ps(dmin_m, act_sums(xs + r * x_stride), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = hsum_avx2(acc[r]);
}

// 8 int32 lanes summing to sc_lo * sum_{l<16} (q[l]-32) x.q[l] + sc_hi * sum_{l>=16} ...,
// with `scales` holding sc_lo in int16 lanes 0-7 and sc_hi in lanes 8-15.
PPINFER_AVX2 inline __m256i q6_scaled_isum(__m256i q, const Q8Block& x, __m256i scales) {
  const __m256i xq = load256(x.q);
  const __m256i q_x = _mm256_maddubs_epi16(q, xq);
  const __m256i bias = _mm256_maddubs_epi16(_mm256_set1_epi8(32), xq);
  return _mm256_madd_epi16(_mm256_sub_epi16(q_x, bias), scales);
}

// Q6_K, one weight row against kRows activation rows, as above.
template <int kRows>
PPINFER_AVX2 inline void dot_q6_k_rows(const uint8_t* w, const Q8Block* x, int64_t x_stride, int k,
                                       float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i bits45 = _mm256_set1_epi8(0x30);
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int i = 0; i < k / kSuperElems; ++i, w += kQ6KBytes) {
    const Q8Block* xs = x + i * kActPerSuper;
    // The 16 scales as int16; each half of the super-block takes its 8 into both lanes.
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kQ6KScAt)));
    const __m256i half_scales[2] = {_mm256_permute2x128_si256(sc16, sc16, 0x00),
                                    _mm256_permute2x128_si256(sc16, sc16, 0x11)};
    // Per row, two independent chains (the FMA latency would bound one), each summed in the
    // same order for any kRows: a row's result does not depend on the rows beside it.
    __m256 sums[kRows][2];
    for (auto& row_sums : sums) row_sums[0] = row_sums[1] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const __m256i ql0 = load256(w + 64 * half);
      const __m256i ql1 = load256(w + 64 * half + 32);
      const __m256i qh = load256(w + kQ6KQhAt + 32 * half);
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(ql0, low4),
                          _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45)),
          _mm256_or_si256(_mm256_and_si256(ql1, low4),
                          _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                          _mm256_and_si256(qh, bits45)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45)),
      };
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __m256i scales = _mm256_shuffle_epi8(half_scales[half], load256(kQ6ScalePicks.pick[t]));
        for (int r = 0; r < kRows; ++r) {
          const Q8Block& xb = xs[r * x_stride + 4 * half + t];
          sums[r][t % 2] = fma_block(q6_scaled_isum(q[t], xb, scales), xb, sums[r][t % 2]);
        }
      }
    }
    uint16_t d_bits;
    std::memcpy(&d_bits, w + kQ6KDAt, sizeof d_bits);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(d_bits));
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_fmadd_ps(d, _mm256_add_ps(sums[r][0], sums[r][1]), acc[r]);
  }
  for (int r = 0; r < kRows; ++r) out[r] = hsum_avx2(acc[r]);
}

// One weight row against kRows activation rows, per GGML type (the table's AVX2 entries
// come from qtypes.h's dot_avx2 / dot_rows_avx2).
template <int kType>
struct Rows {
  template <int kRows>
  PPINFER_AVX2 static void rows(const uint8_t* w, const Q8Block* x, int64_t x_stride, int k, float* out) {
    if constexpr (kType == kQ6KType) {
      dot_q6_k_rows<kRows>(w, x, x_stride, k, out);
    } else {
      dot_k_scale_min_avx2<kType == kQ5KType, kRows>(w, x, x_stride, k, out);
    }
  }
};

#endif  // PPINFER_X86

}  // namespace

const QTypeKernels kKQuantKernels[] = {
    {kQ4KType, kSuperElems, kQ4KBytes, dot_q4_k_scalar, PPINFER_AVX2_FN(dot_avx2<Rows<kQ4KType>>), dequant_q4_k,
     PPINFER_AVX2_FN(dot_rows_avx2<Rows<kQ4KType>>)},
    {kQ5KType, kSuperElems, kQ5KBytes, dot_q5_k_scalar, PPINFER_AVX2_FN(dot_avx2<Rows<kQ5KType>>), dequant_q5_k,
     PPINFER_AVX2_FN(dot_rows_avx2<Rows<kQ5KType>>)},
    {kQ6KType, kSuperElems, kQ6KBytes, dot_q6_k_scalar, PPINFER_AVX2_FN(dot_avx2<Rows<kQ6KType>>), dequant_q6_k,
     PPINFER_AVX2_FN(dot_rows_avx2<Rows<kQ6KType>>)},
};
const int kKQuantKernelCount = sizeof(kKQuantKernels) / sizeof(kKQuantKernels[0]);

}  // namespace ppinfer
