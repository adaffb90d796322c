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

#include "avx2.h"
#include "avx512.h"
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
// AVX2 kernels. One output's chain (qtypes.h), per super-block, with f_j = float(the integer dot
// of 32-value block j, scales included: Q4_K / Q5_K sc_j * sum(q qx), Q6_K
// sum over its two halves of sc * sum((q - 32) qx)), dx_j and s_j activation block j's d and s:
//   inner = dx_0 * f_0, then inner = fma(dx_j, f_j, inner) for j = 1..7
//   Q4_K / Q5_K: mins = m_0 * s_0, then mins = fma(m_j, s_j, mins) for j = 1..7;
//                acc = fma(d, inner, acc), then acc = fnmadd(dmin, mins, acc)
//   Q6_K:        acc = fma(d, inner, acc)
// The integer dots stay within float's 24 bits (Q6_K: at most 32 * 32 * 127 * 128 < 2^24).

#if defined(PPINFER_X86)

using avx2::load256;

// How weight_rows loads code bytes: 32 at a time, in value order (tiles: avx2::Bytes16).
struct Load32 {
  PPINFER_AVX2 __m256i operator()(const uint8_t* p) const { return load256(p); }
};

// The first block of each chain: inner = dx * f (and mins = m * s), later ones fma.
PPINFER_AVX2 inline __m256 chain(bool first, __m256 a, __m256 b, __m256 sum) {
  return first ? _mm256_mul_ps(a, b) : _mm256_fmadd_ps(a, b, sum);
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

// Bytes [sc0-3, m0-3, sc4-7, m4-7] in each 128-bit lane.
PPINFER_AVX2 inline __m256i scale_min_bytes(const uint8_t* packed) {
  const __m256i six = _mm256_set1_epi8(0x3f), four = _mm256_set1_epi8(0x0f);
  const __m256i bits45 = _mm256_set1_epi8(0x30);
  // The 16 bytes from `packed` (the last 4 are the block's first codes, unused) in both lanes.
  const __m256i u = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  const __m256i lo_mid = _mm256_shuffle_epi32(u, 0x44);  // dwords [lo, mid, lo, mid]
  const __m256i hi_hi = _mm256_shuffle_epi32(u, 0xa4);   // dwords [., ., hi, hi]
  const __m256i low_nibbles = _mm256_and_si256(_mm256_srlv_epi32(hi_hi, _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4)), four);
  const __m256i top_bits = _mm256_and_si256(_mm256_srli_epi32(lo_mid, 2), bits45);
  return _mm256_blend_epi32(_mm256_and_si256(lo_mid, six), _mm256_or_si256(low_nibbles, top_bits), 0xcc);
}

// The 8 bytes at `at` (0: scales, 4: mins) of each 4 of scale_min_bytes, as 8 int32 lanes.
PPINFER_AVX2 inline __m256i scale_min_ints(__m256i all, int at) {
  const __m256i pick = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                        8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1);
  return _mm256_shuffle_epi8(all, _mm256_add_epi32(pick, _mm256_set1_epi32(at)));
}

PPINFER_AVX2 inline ScaleMinAvx2 unpack_scale_min_avx2(const uint8_t* packed) {
  const __m256i all = scale_min_bytes(packed);
  const __m256i pick_sc = _mm256_setr_epi8(0, -1, 1, -1, 2, -1, 3, -1, 8, -1, 9, -1, 10, -1, 11, -1,
                                           0, -1, 1, -1, 2, -1, 3, -1, 8, -1, 9, -1, 10, -1, 11, -1);
  return {_mm256_shuffle_epi8(all, pick_sc), _mm256_cvtepi32_ps(scale_min_ints(all, 4))};
}

// Bit j of each byte of v moved to bit 4 (other bits left for the caller's mask).
PPINFER_AVX2 inline __m256i bit_to_4(__m256i v, int j) {
  return j <= 4 ? _mm256_slli_epi16(v, 4 - j) : _mm256_srli_epi16(v, j - 4);
}

// Q4_K and Q5_K (kFifthBit): codes of 32-value block j are the low (even j) or high (odd j)
// nibbles of qs[32 (j / 2) + l], Q5_K's fifth bit bit j of qh[l]. The kernels take their
// integer dots from Dot (avx2.h: MaddubsDot, or VnniDot for AVX-VNNI).
template <bool kFifthBit, class Dot>
struct ScaleMinKernel : avx2::TileEntries<ScaleMinKernel<kFifthBit, Dot>> {
  static constexpr int kBlockBytes = kFifthBit ? kQ5KBytes : kQ4KBytes;
  static constexpr int kQsAt = kFifthBit ? kQ5KQsAt : kQ4KQsAt;

  // Block j's codes from `at` (0: values 0..15, 16: values 16..31) of its 32 code bytes, loaded by `load`.
  template <class Load>
  PPINFER_AVX2 static __m256i codes(const uint8_t* blk, int j, int at, Load load) {
    const __m256i packed = load(blk + kQsAt + 32 * (j / 2) + at);
    __m256i q = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(packed, 4) : packed, _mm256_set1_epi8(0x0f));
    if constexpr (kFifthBit) {
      q = _mm256_or_si256(q, _mm256_and_si256(bit_to_4(load(blk + kQ5KQhAt + at), j), _mm256_set1_epi8(0x10)));
    }
    return q;
  }

  // 8 weight rows against kXRows x rows (x row m's blocks at x + m * x_stride), each block
  // decoded once for all. f_j is float(sum(q qx)) * float(sc_j): exact, as in tile (both
  // integers, their product below 2^24), so the scales apply after the lanes are summed.
  template <int kXRows>
  PPINFER_AVX2 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                       float* acc_io, int64_t ahead) {
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int i = 0; i < k / kSuperElems; ++i) {
      const int64_t at = int64_t{i} * kBlockBytes;
      __m256 scales[kLanes], mins[kLanes];  // [row], lanes j; transposed below to [j], lanes rows
      for (int r = 0; r < kLanes; ++r) {
        avx2::prefetch_block<kBlockBytes>(rows[r] + at, ahead);
        const __m256i all = scale_min_bytes(rows[r] + at + kKScalesAt);
        scales[r] = _mm256_cvtepi32_ps(scale_min_ints(all, 0));
        mins[r] = _mm256_cvtepi32_ps(scale_min_ints(all, 4));
      }
      avx2::transpose8(scales);
      avx2::transpose8(mins);
      __m256 inner[kXRows], mn[kXRows];
#pragma GCC unroll 8
      for (int j = 0; j < kActPerSuper; ++j) {
        __m256i y[kXRows], p[kXRows][kLanes];  // p: Dot::products (MaddubsDot: at most 2 * 31 * 127)
        for (int m = 0; m < kXRows; ++m) y[m] = load256(x[m * x_stride + i * kActPerSuper + j].q);
        for (int r = 0; r < kLanes; ++r) {
          const __m256i q = codes(rows[r] + at, j, 0, Load32{});
          for (int m = 0; m < kXRows; ++m) p[m][r] = Dot::products(q, y[m]);
        }
        for (int m = 0; m < kXRows; ++m) {
          const Q8Block& xb = x[m * x_stride + i * kActPerSuper + j];
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(avx2::product_sums8<Dot>(p[m])), scales[j]);
          inner[m] = chain(j == 0, _mm256_set1_ps(xb.d), f, inner[m]);
          mn[m] = chain(j == 0, mins[j], _mm256_set1_ps(xb.s), mn[m]);
        }
      }
      const __m256 d = avx2::halves8(rows, at), dmin = avx2::halves8(rows, at + 2);
      for (int m = 0; m < kXRows; ++m) {
        acc[m] = _mm256_fmadd_ps(d, inner[m], acc[m]);
        acc[m] = _mm256_fnmadd_ps(dmin, mn[m], acc[m]);
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }

  // Tiles (qtypes.h): one weight row against kGroups groups of 8 x rows, or two against 4.
  template <int kGroups, class XTile>
  PPINFER_AVX2 static void run(const avx2::Layout<XTile>& layout, const uint8_t* w, const XTile* x, int64_t stride,
                               int k, float* acc_io, int64_t ahead) {
    using L = avx2::Layout<XTile>;
    const avx2::Bytes16<XTile> bytes16{layout};
    __m256 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm256_loadu_ps(acc_io + g * kLanes);
    for (int i = 0; i < k / kSuperElems; ++i, w += kBlockBytes) {
      const XTile* xs = x + i * kActPerSuper;
      __m256i sc16[L::kWeightRows];
      alignas(32) float mins[L::kWeightRows][kActPerSuper];
      for (int r = 0; r < L::kWeightRows; ++r) {
        avx2::prefetch_block<kBlockBytes>(w + r * layout.delta, ahead);
        const ScaleMinAvx2 sm = unpack_scale_min_avx2(w + r * layout.delta + kKScalesAt);
        sc16[r] = sm.sc16;
        _mm256_store_ps(mins[r], sm.mins);
      }
      const __m256i scales16 = L::mix(sc16);
      __m256 inner[kGroups], mn[kGroups];
#pragma GCC unroll 8
      for (int j = 0; j < kActPerSuper; ++j) {
        const __m256i lo = codes(w, j, 0, bytes16);
        const __m256i hi = codes(w, j, 16, bytes16);
        const __m256i sc = _mm256_shuffle_epi8(scales16, load256(kScalePicks.pick[j]));
        __m256 row_m[L::kWeightRows];
        for (int r = 0; r < L::kWeightRows; ++r) row_m[r] = _mm256_broadcast_ss(&mins[r][j]);
        const __m256 m = L::mix(row_m);
        for (int g = 0; g < kGroups; ++g) {
          const XTile& xt = xs[g * stride + j];
          // MaddubsDot's int16 holds 8 groups' products of codes <= 15, 4 of codes <= 31.
          const __m256i isum = avx2::scaled_tile_sum<0, 8, kFifthBit ? 4 : 8, Dot>(lo, hi, xt, sc);
          inner[g] = chain(j == 0, L::d(xt), _mm256_cvtepi32_ps(isum), inner[g]);
          mn[g] = chain(j == 0, m, L::s(xt), mn[g]);
        }
      }
      const __m256 d = layout.half(w), dmin = layout.half(w + 2);
      for (int g = 0; g < kGroups; ++g) {
        acc[g] = _mm256_fmadd_ps(d, inner[g], acc[g]);
        acc[g] = _mm256_fnmadd_ps(dmin, mn[g], acc[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) _mm256_storeu_ps(acc_io + g * kLanes, acc[g]);
  }
};

// Q6_K: 32-value block b = 4 half + t of a super-block takes its low nibbles from
// ql[64 half + 32 (t % 2) + l] (high nibbles for t >= 2) and its top two bits from bits 2t, 2t+1
// of qh[32 half + l]; its codes are q - 32 with q in 0..63, scales sc[2b] (values 0..15) and
// sc[2b + 1] (16..31). The kernels take their integer dots from Dot, as ScaleMinKernel's.
template <class Dot>
struct Q6KKernel : avx2::TileEntries<Q6KKernel<Dot>> {
  // Block b's codes q (0..63) from `at` (0 or 16) of its 32 values, loaded by `load`.
  template <class Load>
  PPINFER_AVX2 static __m256i codes(const uint8_t* blk, int b, int at, Load load) {
    const int half = b / 4, t = b % 4;
    const __m256i ql = load(blk + 64 * half + 32 * (t % 2) + at);
    const __m256i qh = load(blk + kQ6KQhAt + 32 * half + at);
    const __m256i low = _mm256_and_si256(t >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0f));
    const __m256i top = 2 * t <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * t) : _mm256_srli_epi16(qh, 2 * t - 4);
    return _mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
  }

  // The codes q (0..63) of one half super-block's 4 blocks (value order), from its ql and qh.
  PPINFER_AVX2 static void half_codes(const uint8_t* blk, int half, __m256i* q) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), bits45 = _mm256_set1_epi8(0x30);
    const __m256i ql0 = load256(blk + 64 * half), ql1 = load256(blk + 64 * half + 32);
    const __m256i qh = load256(blk + kQ6KQhAt + 32 * half);
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), _mm256_and_si256(qh, bits45));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45));
  }

  // Per-(block, 16 values) sums of 4 blocks' Dot::products: [block 0..3 values 0..15 | block
  // 0..3 values 16..31] in int32 (MaddubsDot's lane pairs must add up within int16).
  PPINFER_AVX2 static __m256i half_sums(const __m256i* p) {
    return avx2::quad_sums(Dot::pair_sums(p[0], p[1]), Dot::pair_sums(p[2], p[3]));
  }

  // 8 weight rows against kXRows x rows (x row m's blocks at x + m * x_stride). Per row and half
  // super-block, the 4 blocks' sums of q qx per 16 values less 32 times x's (shared by the
  // rows), times their scales, then the two halves of each block added: f exactly (all integers
  // below 2^24), as tile's; the rows' f are then transposed to lanes = rows for the chain.
  template <int kXRows>
  PPINFER_AVX2 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                       float* acc_io, int64_t ahead) {
    // Scale byte 2t + h of a half's 8 for lane t + 4h (the layout of half_sums).
    const __m128i scale_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int i = 0; i < k / kSuperElems; ++i) {
      const int64_t at = int64_t{i} * kQ6KBytes;
      __m256i y[kXRows][kActPerSuper], offsets[kXRows][2];  // offsets: 32 sum(qx) per block and 16 values
      for (int m = 0; m < kXRows; ++m) {
        const Q8Block* xs = x + m * x_stride + i * kActPerSuper;
        for (int half = 0; half < 2; ++half) {
          __m256i p[4];
          for (int t = 0; t < 4; ++t) {
            y[m][4 * half + t] = load256(xs[4 * half + t].q);
            p[t] = Dot::products(_mm256_set1_epi8(32), y[m][4 * half + t]);
          }
          offsets[m][half] = half_sums(p);
        }
      }
      __m256 f[kXRows][kLanes];  // [x row][weight row], lanes: blocks 0..7
      for (int r = 0; r < kLanes; ++r) {
        avx2::prefetch_block<kQ6KBytes>(rows[r] + at, ahead);
        __m256 block_sums[kXRows][2];
        for (int half = 0; half < 2; ++half) {
          __m256i q[4];
          half_codes(rows[r] + at, half, q);
          const __m128i sc8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + at + kQ6KScAt + 8 * half));
          const __m256 scales = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_shuffle_epi8(sc8, scale_order)));
          for (int m = 0; m < kXRows; ++m) {
            __m256i p[4];  // MaddubsDot: int16, at most 2 * 63 * 127
            for (int t = 0; t < 4; ++t) p[t] = Dot::products(q[t], y[m][4 * half + t]);
            const __m256 scaled =
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(half_sums(p), offsets[m][half])), scales);
            block_sums[m][half] = _mm256_add_ps(scaled, _mm256_permute2f128_ps(scaled, scaled, 0x01));
          }
        }
        for (int m = 0; m < kXRows; ++m) f[m][r] = _mm256_blend_ps(block_sums[m][0], block_sums[m][1], 0xF0);
      }
      const __m256 d = avx2::halves8(rows, at + kQ6KDAt);
      for (int m = 0; m < kXRows; ++m) {
        avx2::transpose8(f[m]);  // f[m][b], lanes rows
        const Q8Block* xs = x + m * x_stride + i * kActPerSuper;
        __m256 inner = _mm256_setzero_ps();
        for (int b = 0; b < kActPerSuper; ++b) inner = chain(b == 0, _mm256_set1_ps(xs[b].d), f[m][b], inner);
        acc[m] = _mm256_fmadd_ps(d, inner, acc[m]);
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }

  // Tiles (qtypes.h): one weight row against kGroups groups of 8 x rows, or two against 4.
  // Products with q (<= 63) summed per 16 values (MaddubsDot: two groups of 4 at a time in
  // int16), scaled, less 32 sc times x's half sums.
  template <int kGroups, class XTile>
  PPINFER_AVX2 static void run(const avx2::Layout<XTile>& layout, const uint8_t* w, const XTile* x, int64_t stride,
                               int k, float* acc_io, int64_t ahead) {
    using L = avx2::Layout<XTile>;
    const avx2::Bytes16<XTile> bytes16{layout};
    __m256 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm256_loadu_ps(acc_io + g * kLanes);
    for (int i = 0; i < k / kSuperElems; ++i, w += kQ6KBytes) {
      const XTile* xs = x + i * kActPerSuper;
      for (int r = 0; r < L::kWeightRows; ++r) avx2::prefetch_block<kQ6KBytes>(w + r * layout.delta, ahead);
      __m256 inner[kGroups];
#pragma GCC unroll 8
      for (int b = 0; b < kActPerSuper; ++b) {
        const __m256i lo = codes(w, b, 0, bytes16);
        const __m256i hi = codes(w, b, 16, bytes16);
        __m256i sc_lo[L::kWeightRows], sc_hi[L::kWeightRows], offset_scales[L::kWeightRows];
        for (int r = 0; r < L::kWeightRows; ++r) {
          const int8_t* sc = reinterpret_cast<const int8_t*>(w + r * layout.delta + kQ6KScAt);
          sc_lo[r] = _mm256_set1_epi16(sc[2 * b]);
          sc_hi[r] = _mm256_set1_epi16(sc[2 * b + 1]);
          offset_scales[r] =  // int16 pairs [32 sc_lo, 32 sc_hi]
              _mm256_set1_epi32(static_cast<int32_t>((static_cast<uint32_t>(32 * sc[2 * b]) & 0xffffu) |
                                                     (static_cast<uint32_t>(32 * sc[2 * b + 1]) << 16)));
        }
        const __m256i scale_lo = L::mix(sc_lo), scale_hi = L::mix(sc_hi), offset_scale = L::mix(offset_scales);
        for (int g = 0; g < kGroups; ++g) {
          const XTile& xt = xs[g * stride + b];
          const __m256i low_half = avx2::scaled_tile_sum<0, 4, 2, Dot>(lo, hi, xt, scale_lo);
          const __m256i high_half = avx2::scaled_tile_sum<4, 8, 2, Dot>(lo, hi, xt, scale_hi);
          const __m256i offset = _mm256_madd_epi16(L::half_sums(xt), offset_scale);
          const __m256i isum = _mm256_sub_epi32(_mm256_add_epi32(low_half, high_half), offset);
          inner[g] = chain(b == 0, L::d(xt), _mm256_cvtepi32_ps(isum), inner[g]);
        }
      }
      const __m256 d = layout.half(w + kQ6KDAt);
      for (int g = 0; g < kGroups; ++g) acc[g] = _mm256_fmadd_ps(d, inner[g], acc[g]);
    }
    for (int g = 0; g < kGroups; ++g) _mm256_storeu_ps(acc_io + g * kLanes, acc[g]);
  }
};

#endif  // PPINFER_X86

// ---------------------------------------------------------------------------------------------
// AVX-512 (VNNI) tile16 kernels (avx512.h): the AVX2 chains above in 16 lanes, each block's
// integer dot by dpbusd. f_j is float(sum(q qx)) * sc_j (Q4_K / Q5_K: exact, as in the AVX2
// kernels) and Q6_K's sc_lo (sum_lo(q qx) - 32 sum_lo(qx)) + sc_hi (...) in int32 (exact).
#if defined(PPINFER_HAS_AVX512)

// Q4_K and Q5_K (kFifthBit).
template <bool kFifthBit>
struct ScaleMinKernel16 {
  static constexpr int kBlockBytes = kFifthBit ? kQ5KBytes : kQ4KBytes;
  static constexpr int kQsAt = kFifthBit ? kQ5KQsAt : kQ4KQsAt;

  PPINFER_AVX512 static void decode(const uint8_t* blk, int j, avx512::Codes* c) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQsAt + 32 * (j / 2)));
    __m256i q = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(packed, 4) : packed, _mm256_set1_epi8(0x0f));
    if constexpr (kFifthBit) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ5KQhAt));
      const __mmask32 set = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(1 << j)));
      q = _mm256_or_si256(q, _mm256_maskz_mov_epi8(set, _mm256_set1_epi8(0x10)));
    }
    avx512::store(q, c);
  }

  template <int kGroups>
  PPINFER_AVX512 static void tile16(const uint8_t* w, const Q8Tile16* x, int64_t stride, int k, float* acc_io,
                                    int64_t ahead) {
    __m512 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm512_loadu_ps(acc_io + g * kWideLanes);
    for (int i = 0; i < k / kSuperElems; ++i, w += kBlockBytes) {
      avx512::prefetch_block<kBlockBytes>(w, ahead);
      const Q8Tile16* xs = x + i * kActPerSuper;
      const ScaleMin sm = unpack_scale_min(w + kKScalesAt);
      __m512 inner[kGroups], mn[kGroups];
      for (int j = 0; j < kActPerSuper; ++j) {
        avx512::Codes codes;
        decode(w, j, &codes);
        const __m512 sc = _mm512_set1_ps(static_cast<float>(sm.sc[j]));
        const __m512 m = _mm512_set1_ps(static_cast<float>(sm.m[j]));
        for (int g = 0; g < kGroups; ++g) {
          const Q8Tile16& xt = xs[g * stride + j];
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(avx512::isum<0, 8>(codes, xt)), sc);
          inner[g] = j == 0 ? _mm512_mul_ps(avx512::d(xt), f) : _mm512_fmadd_ps(avx512::d(xt), f, inner[g]);
          mn[g] = j == 0 ? _mm512_mul_ps(m, avx512::s(xt)) : _mm512_fmadd_ps(m, avx512::s(xt), mn[g]);
        }
      }
      const __m512 d = avx512::half(w), dmin = avx512::half(w + 2);
      for (int g = 0; g < kGroups; ++g) {
        acc[g] = _mm512_fmadd_ps(d, inner[g], acc[g]);
        acc[g] = _mm512_fnmadd_ps(dmin, mn[g], acc[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) _mm512_storeu_ps(acc_io + g * kWideLanes, acc[g]);
  }
};

struct Q6KKernel16 {
  // Block b's codes q (0..63) as unsigned bytes.
  PPINFER_AVX512 static void decode(const uint8_t* blk, int b, avx512::Codes* c) {
    const int half = b / 4, t = b % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * half + 32 * (t % 2)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ6KQhAt + 32 * half));
    const __m256i low = _mm256_and_si256(t >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0f));
    const __m256i top = 2 * t <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * t) : _mm256_srli_epi16(qh, 2 * t - 4);
    avx512::store(_mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi8(0x30))), c);
  }

  template <int kGroups>
  PPINFER_AVX512 static void tile16(const uint8_t* w, const Q8Tile16* x, int64_t stride, int k, float* acc_io,
                                    int64_t ahead) {
    __m512 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm512_loadu_ps(acc_io + g * kWideLanes);
    for (int i = 0; i < k / kSuperElems; ++i, w += kQ6KBytes) {
      avx512::prefetch_block<kQ6KBytes>(w, ahead);
      const Q8Tile16* xs = x + i * kActPerSuper;
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + kQ6KScAt);
      __m512 inner[kGroups];
      for (int b = 0; b < kActPerSuper; ++b) {
        avx512::Codes codes;
        decode(w, b, &codes);
        const __m512i sc_lo = _mm512_set1_epi32(sc[2 * b]), sc_hi = _mm512_set1_epi32(sc[2 * b + 1]);
        for (int g = 0; g < kGroups; ++g) {
          const Q8Tile16& xt = xs[g * stride + b];
          const __m512i lo = _mm512_sub_epi32(avx512::isum<0, 4>(codes, xt), _mm512_slli_epi32(avx512::half_sum(xt, 0), 5));
          const __m512i hi = _mm512_sub_epi32(avx512::isum<4, 8>(codes, xt), _mm512_slli_epi32(avx512::half_sum(xt, 1), 5));
          const __m512i isum = _mm512_add_epi32(_mm512_mullo_epi32(lo, sc_lo), _mm512_mullo_epi32(hi, sc_hi));
          const __m512 f = _mm512_cvtepi32_ps(isum);
          inner[g] = b == 0 ? _mm512_mul_ps(avx512::d(xt), f) : _mm512_fmadd_ps(avx512::d(xt), f, inner[g]);
        }
      }
      const __m512 d = avx512::half(w + kQ6KDAt);
      for (int g = 0; g < kGroups; ++g) acc[g] = _mm512_fmadd_ps(d, inner[g], acc[g]);
    }
    for (int g = 0; g < kGroups; ++g) _mm512_storeu_ps(acc_io + g * kWideLanes, acc[g]);
  }
};

using Q4KKernel16 = ScaleMinKernel16<false>;
using Q5KKernel16 = ScaleMinKernel16<true>;

// Weight rows (avx512.h): 8 weight rows against kXRows x rows, the row pairs (r, r + 4) in one
// vector, each block's integer dots by dpbusd and row_sums8; the float chain is the AVX2
// weight-rows kernel's, operation for operation (f_j exact in both).

// Q4_K and Q5_K (kFifthBit): the AVX2 ScaleMinKernel::weight_rows.
template <bool kFifthBit>
struct ScaleMinRows16 {
  static constexpr int kBlockBytes = kFifthBit ? kQ5KBytes : kQ4KBytes;
  static constexpr int kQsAt = kFifthBit ? kQ5KQsAt : kQ4KQsAt;
  static constexpr int kPairs = kLanes / 2;

  template <int kXRows>
  PPINFER_AVX512 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                         float* acc_io, int64_t ahead) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int i = 0; i < k / kSuperElems; ++i) {
      const int64_t at = int64_t{i} * kBlockBytes;
      __m256 scales[kLanes], mins[kLanes];  // [row], lanes j; transposed below to [j], lanes rows
      for (int r = 0; r < kLanes; ++r) {
        avx2::prefetch_block<kBlockBytes>(rows[r] + at, ahead);
        const __m256i all = scale_min_bytes(rows[r] + at + kKScalesAt);
        scales[r] = _mm256_cvtepi32_ps(scale_min_ints(all, 0));
        mins[r] = _mm256_cvtepi32_ps(scale_min_ints(all, 4));
      }
      avx2::transpose8(scales);
      avx2::transpose8(mins);
      __m512i qh[kPairs];
      if constexpr (kFifthBit) {
        for (int r = 0; r < kPairs; ++r) qh[r] = avx512::pair_bytes32(rows[r] + at + kQ5KQhAt, rows[r + kPairs] + at + kQ5KQhAt);
      }
      __m256 inner[kXRows], mn[kXRows];
#pragma GCC unroll 8
      for (int j = 0; j < kActPerSuper; ++j) {
        __m512i y[kXRows], p[kXRows][kPairs];
        for (int m = 0; m < kXRows; ++m) y[m] = avx512::x_twice(x[m * x_stride + i * kActPerSuper + j].q);
        for (int r = 0; r < kPairs; ++r) {
          const int64_t qs = at + kQsAt + 32 * (j / 2);
          const __m512i packed = avx512::pair_bytes32(rows[r] + qs, rows[r + kPairs] + qs);
          __m512i q = _mm512_and_si512(j % 2 ? _mm512_srli_epi16(packed, 4) : packed, low4);
          if constexpr (kFifthBit) {
            const __mmask64 set = _mm512_test_epi8_mask(qh[r], _mm512_set1_epi8(static_cast<char>(1 << j)));
            q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(set, _mm512_set1_epi8(0x10)));
          }
          for (int m = 0; m < kXRows; ++m) p[m][r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, y[m]);
        }
        for (int m = 0; m < kXRows; ++m) {
          const Q8Block& xb = x[m * x_stride + i * kActPerSuper + j];
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(avx512::row_sums8(p[m])), scales[j]);
          inner[m] = chain(j == 0, _mm256_set1_ps(xb.d), f, inner[m]);
          mn[m] = chain(j == 0, mins[j], _mm256_set1_ps(xb.s), mn[m]);
        }
      }
      const __m256 d = avx2::halves8(rows, at), dmin = avx2::halves8(rows, at + 2);
      for (int m = 0; m < kXRows; ++m) {
        acc[m] = _mm256_fmadd_ps(d, inner[m], acc[m]);
        acc[m] = _mm256_fnmadd_ps(dmin, mn[m], acc[m]);
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }
};

// Q6_K: the AVX2 Q6KKernel::weight_rows. Block b's f is sc[2b] (sum(q qx) - 32 sum(qx)) over
// values 0..15 plus sc[2b + 1] times the same over 16..31, all in int32: dpbusd's lanes 0-3 of
// a row hold values 0..15, lanes 4-7 values 16..31, so the scales multiply lanes before the sum.
struct Q6KRows16 {
  static constexpr int kPairs = kLanes / 2;

  template <int kXRows>
  PPINFER_AVX512 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                         float* acc_io, int64_t ahead) {
    const __m512i low4 = _mm512_set1_epi8(0x0f), bits45 = _mm512_set1_epi8(0x30);
    // Lane l of a row pair's scale pick: sc[2b + l / 4] of row a (l < 8), of row b (16 + ...) after.
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 16, 16, 16, 16, 17, 17, 17, 17);
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int i = 0; i < k / kSuperElems; ++i) {
      const int64_t at = int64_t{i} * kQ6KBytes;
      __m512i sc[kPairs][2];  // the 16 scales of rows r and r + 4, as int32
      for (int r = 0; r < kPairs; ++r) {
        avx2::prefetch_block<kQ6KBytes>(rows[r] + at, ahead);
        avx2::prefetch_block<kQ6KBytes>(rows[r + kPairs] + at, ahead);
        for (int h = 0; h < 2; ++h) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r + h * kPairs] + at + kQ6KScAt));
          sc[r][h] = _mm512_cvtepi8_epi32(bytes);
        }
      }
      __m256 inner[kXRows];
#pragma GCC unroll 8
      for (int b = 0; b < kActPerSuper; ++b) {
        const int half = b / 4, t = b % 4;
        __m512i y[kXRows], start[kXRows], p[kXRows][kPairs];
        for (int m = 0; m < kXRows; ++m) {
          y[m] = avx512::x_twice(x[m * x_stride + i * kActPerSuper + b].q);
          const __m512i zero = _mm512_setzero_si512();
          start[m] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(32), y[m]));
        }
        const __m512i pick_b = _mm512_add_epi32(pick, _mm512_set1_epi32(2 * b));
        for (int r = 0; r < kPairs; ++r) {
          const int64_t ql_at = at + 64 * half + 32 * (t % 2), qh_at = at + kQ6KQhAt + 32 * half;
          const __m512i ql = avx512::pair_bytes32(rows[r] + ql_at, rows[r + kPairs] + ql_at);
          const __m512i qh = avx512::pair_bytes32(rows[r] + qh_at, rows[r + kPairs] + qh_at);
          const __m512i low = _mm512_and_si512(t >= 2 ? _mm512_srli_epi16(ql, 4) : ql, low4);
          const __m512i top = 2 * t <= 4 ? _mm512_slli_epi16(qh, 4 - 2 * t) : _mm512_srli_epi16(qh, 2 * t - 4);
          const __m512i q = _mm512_or_si512(low, _mm512_and_si512(top, bits45));
          const __m512i scale = _mm512_permutex2var_epi32(sc[r][0], pick_b, sc[r][1]);
          for (int m = 0; m < kXRows; ++m) {
            p[m][r] = _mm512_mullo_epi32(_mm512_dpbusd_epi32(start[m], q, y[m]), scale);
          }
        }
        for (int m = 0; m < kXRows; ++m) {
          const __m256 f = _mm256_cvtepi32_ps(avx512::row_sums8(p[m]));
          const float dx = x[m * x_stride + i * kActPerSuper + b].d;
          inner[m] = chain(b == 0, _mm256_set1_ps(dx), f, inner[m]);
        }
      }
      const __m256 d = avx2::halves8(rows, at + kQ6KDAt);
      for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_fmadd_ps(d, inner[m], acc[m]);
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }
};

#endif  // PPINFER_HAS_AVX512

}  // namespace

#if defined(PPINFER_X86)
template <class Dot>
using Q4KKernel = ScaleMinKernel<false, Dot>;
template <class Dot>
using Q5KKernel = ScaleMinKernel<true, Dot>;
#endif

// The table entries of Kernel<Dot> (AVX2, AVX-VNNI), Kernel16 and Rows16.
#define PPINFER_KQUANT_AVX2(Kernel, Kernel16, Rows16)                                                      \
  PPINFER_AVX2_FN(dot_weight_rows_avx2<Kernel<avx2::MaddubsDot>>),                                         \
      PPINFER_AVX2_FN(dot_tile_avx2<Kernel<avx2::MaddubsDot>>),                                            \
      PPINFER_AVX2_FN(dot_pair_tile_avx2<Kernel<avx2::MaddubsDot>>),                                       \
      PPINFER_AVX512_FN(dot_tile16_avx512<Kernel16>), PPINFER_AVX512_FN(dot_weight_rows_avx512<Rows16>), \
      PPINFER_AVXVNNI_FN(dot_weight_rows_avx2<avx2::OnAvxVnni<Kernel<avx2::VnniDot>>>),                    \
      PPINFER_AVXVNNI_FN(dot_tile_avx2<avx2::OnAvxVnni<Kernel<avx2::VnniDot>>>),                           \
      PPINFER_AVXVNNI_FN(dot_pair_tile_avx2<avx2::OnAvxVnni<Kernel<avx2::VnniDot>>>)

const QTypeKernels kKQuantKernels[] = {
    {kQ4KType, kSuperElems, kQ4KBytes, dot_q4_k_scalar, dequant_q4_k, PPINFER_KQUANT_AVX2(Q4KKernel, Q4KKernel16, ScaleMinRows16<false>)},
    {kQ5KType, kSuperElems, kQ5KBytes, dot_q5_k_scalar, dequant_q5_k, PPINFER_KQUANT_AVX2(Q5KKernel, Q5KKernel16, ScaleMinRows16<true>)},
    {kQ6KType, kSuperElems, kQ6KBytes, dot_q6_k_scalar, dequant_q6_k, PPINFER_KQUANT_AVX2(Q6KKernel, Q6KKernel16, Q6KRows16)},
};
const int kKQuantKernelCount = sizeof(kKQuantKernels) / sizeof(kKQuantKernels[0]);

}  // namespace ppinfer
