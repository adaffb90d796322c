// Legacy block kernels: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 rows against Q8Block activations.
//
// Every legacy block holds 32 values, so one stored block meets exactly one activation block.
// Stored layouts (ggml's block_q4_0 ... block_q8_0, little-endian, no padding):
//   Q4_0 (18 bytes): fp16 d | 16 bytes qs                  w = d * (q - 8)
//   Q4_1 (20 bytes): fp16 d | fp16 m | 16 bytes qs         w = d * q + m
//   Q5_0 (22 bytes): fp16 d | 4 bytes qh | 16 bytes qs     w = d * (q - 16)
//   Q5_1 (24 bytes): fp16 d | fp16 m | 4 bytes qh | 16 bytes qs   w = d * q + m
//   Q8_0 (34 bytes): fp16 d | 32 int8 qs                   w = d * q
// In the 4- and 5-bit types, qs[j]'s low nibble is value j and its high nibble value j + 16;
// the fifth bit of value j is bit j of qh read as a little-endian uint32.
//
// With x ~= dx * qx and s = dx * sum(qx), one block contributes
//   d * dx * sum(q * qx) + m * s      (Q4_0: m = -8 d, Q5_0: m = -16 d, Q8_0: m = 0)
// so the integer part never needs the offset. The scalar dots subtract the offset in integers
// instead (exact, and so a reference for the folded AVX2 sums).
#include <cstdint>
#include <cstring>

#include "qtypes.h"


namespace ppinfer {
namespace {

constexpr int kBlock = 32;  // values per legacy block (= kQ8Elems)
constexpr int kHalf = kBlock / 2;

constexpr int kQ4_0Bytes = 18;
constexpr int kQ4_1Bytes = 20;
constexpr int kQ5_0Bytes = 22;
constexpr int kQ5_1Bytes = 24;
constexpr int kQ8_0Bytes = 34;

// ---- portable code -------------------------------------------------------------------------

// The scalar code is written for the compiler to vectorize with the baseline ISA (SSE2,
// NEON): codes in bytes, products of 16-bit values summed into 32 bits.

// The 32 codes of a block: four bits from its 16 bytes qs and, for the 5-bit types, the fifth
// from its 4 bytes qh (bit j of qh: value j).
template <bool kFiveBit>
inline void unpack_codes(const uint8_t* qs, const uint8_t* qh, uint8_t* q) {
  uint8_t high[kBlock] = {};  // 16 where value j has its fifth bit
  if constexpr (kFiveBit) {
    uint32_t bits;
    std::memcpy(&bits, qh, sizeof bits);
    for (int j = 0; j < kBlock; ++j) high[j] = static_cast<uint8_t>(((bits >> j) & 1u) << 4);
  }
  for (int j = 0; j < kHalf; ++j) {
    q[j] = static_cast<uint8_t>((qs[j] & 0x0F) | high[j]);
    q[j + kHalf] = static_cast<uint8_t>((qs[j] >> 4) | high[j + kHalf]);
  }
}

// sum((q[j] - offset) * qx[j]) over one block, exact in integers.
inline int32_t int_dot(const uint8_t* q, int16_t offset, const int8_t* qx) {
  int32_t sum = 0;
  for (int j = 0; j < kBlock; ++j) sum += static_cast<int16_t>(q[j] - offset) * static_cast<int16_t>(qx[j]);
  return sum;
}

// Symmetric types (w = d * (q - offset)): Q4_0 and Q5_0.
template <int kBytes, int kOffset, bool kFiveBit>
float dot_symmetric_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  uint8_t q[kBlock];
  for (int b = 0; b < k / kBlock; ++b, w += kBytes) {
    unpack_codes<kFiveBit>(w + kBytes - kHalf, w + 2, q);
    sum += load_fp16(w) * x[b].d * static_cast<float>(int_dot(q, kOffset, x[b].q));
  }
  return sum;
}

// Types with a minimum (w = d * q + m): Q4_1 and Q5_1.
template <int kBytes, bool kFiveBit>
float dot_offset_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  uint8_t q[kBlock];
  for (int b = 0; b < k / kBlock; ++b, w += kBytes) {
    unpack_codes<kFiveBit>(w + kBytes - kHalf, w + 4, q);
    const float isum = static_cast<float>(int_dot(q, 0, x[b].q));
    sum += load_fp16(w) * x[b].d * isum + load_fp16(w + 2) * x[b].s;
  }
  return sum;
}

float dot_q8_0_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  for (int b = 0; b < k / kBlock; ++b, w += kQ8_0Bytes) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w + 2);
    int32_t isum = 0;
    for (int j = 0; j < kBlock; ++j) isum += static_cast<int16_t>(q[j]) * static_cast<int16_t>(x[b].q[j]);
    sum += load_fp16(w) * x[b].d * static_cast<float>(isum);
  }
  return sum;
}

// Dequantization in gguf-py's float32 arithmetic: d * (q - offset), or d * q + m.
template <int kBytes, int kOffset, bool kFiveBit>
void dequant_symmetric(const uint8_t* w, float* out, int k) {
  uint8_t q[kBlock];
  for (int b = 0; b < k / kBlock; ++b, w += kBytes, out += kBlock) {
    const float d = load_fp16(w);
    unpack_codes<kFiveBit>(w + kBytes - kHalf, w + 2, q);
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(q[j] - kOffset);
  }
}

template <int kBytes, bool kFiveBit>
void dequant_offset(const uint8_t* w, float* out, int k) {
  uint8_t q[kBlock];
  for (int b = 0; b < k / kBlock; ++b, w += kBytes, out += kBlock) {
    const float d = load_fp16(w);
    const float m = load_fp16(w + 2);
    unpack_codes<kFiveBit>(w + kBytes - kHalf, w + 4, q);
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(q[j]) + m;
  }
}

void dequant_q8_0(const uint8_t* w, float* out, int k) {
  for (int b = 0; b < k / kBlock; ++b, w += kQ8_0Bytes, out += kBlock) {
    const float d = load_fp16(w);
    const int8_t* q = reinterpret_cast<const int8_t*>(w + 2);
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(q[j]);
  }
}

// ---- AVX2 ----------------------------------------------------------------------------------
#ifdef PPINFER_X86

// The fp16 at p, in all 8 lanes.
PPINFER_AVX2 inline __m256 broadcast_half(const uint8_t* p) {
  int16_t h;
  std::memcpy(&h, p, sizeof h);
  return _mm256_cvtph_ps(_mm_set1_epi16(h));
}

// The two fp16 at p (a block's d and m) in lanes 0 and 1.
PPINFER_AVX2 inline __m128 two_halves(const uint8_t* p) {
  int32_t dm;
  std::memcpy(&dm, p, sizeof dm);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
}

// The 32 four-bit codes of a block as bytes 0..15, in value order: qs in both 128-bit lanes,
// the upper lane shifted right by 4 (a 64-bit shift: the bits it pulls in are masked off).
PPINFER_AVX2 inline __m256i nibbles(const uint8_t* qs) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  const __m256i shifted = _mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

// 16 in byte j where bit j of the block's qh is set, else 0.
PPINFER_AVX2 inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, sizeof bits);
  // byte j takes qh byte j / 8, then keeps only bit j % 8.
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
  const __m256i other_bits = _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFELL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, other_bits), _mm256_set1_epi8(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// Codes of block `w` of a 4- or 5-bit type whose qs are its last 16 bytes and qh (if any)
// start at byte kQhAt.
template <int kBytes, int kQhAt>
PPINFER_AVX2 inline __m256i codes(const uint8_t* w) {
  const __m256i low = nibbles(w + kBytes - kHalf);
  if constexpr (kQhAt < 0) {
    return low;
  } else {
    return _mm256_or_si256(low, fifth_bits(w + kQhAt));
  }
}

// sum(q * qx) in 8 int32 lanes, as floats, for unsigned codes q (0..31) and activations qx.
PPINFER_AVX2 inline __m256 unsigned_dot(__m256i q, const int8_t* qx) {
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx));
  const __m256i pairs = _mm256_maddubs_epi16(q, y);  // 16 x int16, |.| <= 2 * 31 * 127
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// The same for signed codes q (-128..127): |q| against qx with q's sign.
PPINFER_AVX2 inline __m256 signed_dot(__m256i q, const int8_t* qx) {
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(y, q));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

PPINFER_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Each kind of block below has decode(w), which reads one weight block, and add(), which adds
// its product with one activation block to that activation row's accumulators: an 8-lane
// acc, and a 4-lane offset for kinds whose offset term needs one. finish() makes the sum.

// Q4_0 / Q5_0: w = d * (q - kOffset). Adds d * (dx * sum(q * qx) - kOffset * s); the offset is
// spread over the 8 lanes (kOffset / 8 * s each), so it costs no scalar work.
template <int kBytes_, int kOffset, int kQhAt>
struct SymmetricBlock {
  static constexpr int kBytes = kBytes_;
  __m256i q;  // codes 0..31
  __m256 d;

  PPINFER_AVX2 static SymmetricBlock decode(const uint8_t* w) {
    return {codes<kBytes, kQhAt>(w), broadcast_half(w)};
  }
  PPINFER_AVX2 __m256 add(const Q8Block& x, __m256 acc, __m128&) const {
    __m256 s = _mm256_broadcast_ss(&x.s);
    if constexpr (kOffset != 8) s = _mm256_mul_ps(s, _mm256_set1_ps(kOffset / 8.0f));
    return _mm256_fmadd_ps(d, _mm256_fmsub_ps(_mm256_broadcast_ss(&x.d), unsigned_dot(q, x.q), s), acc);
  }
  PPINFER_AVX2 static float finish(__m256 acc, __m128) { return hsum(acc); }
};

// Q4_1 / Q5_1: w = d * q + m. Adds d * dx * sum(q * qx) to acc and m * s to lane 1 of offset.
template <int kBytes_, int kQhAt>
struct OffsetBlock {
  static constexpr int kBytes = kBytes_;
  __m256i q;  // codes 0..31
  __m128 dm;  // [d, m, 0, 0]

  PPINFER_AVX2 static OffsetBlock decode(const uint8_t* w) { return {codes<kBytes, kQhAt>(w), two_halves(w)}; }
  PPINFER_AVX2 __m256 add(const Q8Block& x, __m256 acc, __m128& offset) const {
    const __m128 scale = _mm_mul_ss(dm, _mm_load_ss(&x.d));  // [d * dx, m, 0, 0]
    offset = _mm_fmadd_ps(dm, _mm_broadcast_ss(&x.s), offset);
    return _mm256_fmadd_ps(_mm256_broadcastss_ps(scale), unsigned_dot(q, x.q), acc);
  }
  PPINFER_AVX2 static float finish(__m256 acc, __m128 offset) {
    return hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(offset));
  }
};

// Q8_0: w = d * q. Adds d * dx * sum(q * qx), as |q| against qx with q's sign.
struct Q8_0Block {
  static constexpr int kBytes = kQ8_0Bytes;
  __m256i q;      // codes -128..127
  __m256i abs_q;  // |q| as unsigned bytes
  __m256 d;

  PPINFER_AVX2 static Q8_0Block decode(const uint8_t* w) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    return {q, _mm256_abs_epi8(q), broadcast_half(w)};
  }
  PPINFER_AVX2 __m256 add(const Q8Block& x, __m256 acc, __m128&) const {
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q));
    const __m256i pairs = _mm256_maddubs_epi16(abs_q, _mm256_sign_epi8(y, q));  // |.| <= 2 * 128 * 127
    const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    return _mm256_fmadd_ps(d, _mm256_mul_ps(_mm256_broadcast_ss(&x.d), p), acc);
  }
  PPINFER_AVX2 static float finish(__m256 acc, __m128) { return hsum(acc); }
};

// One weight row against kRows activation rows: each block decoded once, one chain per row.
// A row's sum is formed the same way for every kRows, so its result does not depend on how
// many rows share the call (or on the batch it came in).
template <class Block>
struct Rows {
  template <int kRows>
  PPINFER_AVX2 static void rows(const uint8_t* w, const Q8Block* x, int64_t x_stride, int k, float* out) {
    __m256 acc[kRows];
    __m128 off[kRows];
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm256_setzero_ps();
      off[r] = _mm_setzero_ps();
    }
    for (int b = 0; b < k / kBlock; ++b, w += Block::kBytes) {
      const Block block = Block::decode(w);
      for (int r = 0; r < kRows; ++r) acc[r] = block.add(x[r * x_stride + b], acc[r], off[r]);
    }
    for (int r = 0; r < kRows; ++r) out[r] = Block::finish(acc[r], off[r]);
  }
};

// kDotWeightRows weight rows (row r at w + r * w_stride) against one activation row. Each row
// keeps its own chain, formed exactly as Rows<Block>::rows<1> forms it (same blocks, same
// order, same finish), so a row's result does not depend on which kernel computed it; the
// independent chains let the CPU overlap one row's decode and FMAs with the others'.
template <class Block>
PPINFER_AVX2 void dot_weight_rows_avx2(const uint8_t* w, int64_t w_stride, const Q8Block* x, int k,
                                              float* out) {
  __m256 acc[kDotWeightRows];
  __m128 off[kDotWeightRows];
  for (int r = 0; r < kDotWeightRows; ++r) {
    acc[r] = _mm256_setzero_ps();
    off[r] = _mm_setzero_ps();
  }
  for (int b = 0; b < k / kBlock; ++b, w += Block::kBytes) {
    for (int r = 0; r < kDotWeightRows; ++r) acc[r] = Block::decode(w + r * w_stride).add(x[b], acc[r], off[r]);
  }
  for (int r = 0; r < kDotWeightRows; ++r) out[r] = Block::finish(acc[r], off[r]);
}

using Q4_0Block = SymmetricBlock<kQ4_0Bytes, 8, -1>;
using Q5_0Block = SymmetricBlock<kQ5_0Bytes, 16, 2>;
using Q4_1Block = OffsetBlock<kQ4_1Bytes, -1>;
using Q5_1Block = OffsetBlock<kQ5_1Bytes, 4>;

#endif  // PPINFER_X86

}  // namespace

const QTypeKernels kLegacyKernels[] = {
    {2, kBlock, kQ4_0Bytes, dot_symmetric_scalar<kQ4_0Bytes, 8, false>, PPINFER_AVX2_FN(dot_avx2<Rows<Q4_0Block>>),
     dequant_symmetric<kQ4_0Bytes, 8, false>, PPINFER_AVX2_FN(dot_rows_avx2<Rows<Q4_0Block>>),
     PPINFER_AVX2_FN(dot_weight_rows_avx2<Q4_0Block>)},
    {3, kBlock, kQ4_1Bytes, dot_offset_scalar<kQ4_1Bytes, false>, PPINFER_AVX2_FN(dot_avx2<Rows<Q4_1Block>>),
     dequant_offset<kQ4_1Bytes, false>, PPINFER_AVX2_FN(dot_rows_avx2<Rows<Q4_1Block>>),
     PPINFER_AVX2_FN(dot_weight_rows_avx2<Q4_1Block>)},
    {6, kBlock, kQ5_0Bytes, dot_symmetric_scalar<kQ5_0Bytes, 16, true>, PPINFER_AVX2_FN(dot_avx2<Rows<Q5_0Block>>),
     dequant_symmetric<kQ5_0Bytes, 16, true>, PPINFER_AVX2_FN(dot_rows_avx2<Rows<Q5_0Block>>),
     PPINFER_AVX2_FN(dot_weight_rows_avx2<Q5_0Block>)},
    {7, kBlock, kQ5_1Bytes, dot_offset_scalar<kQ5_1Bytes, true>, PPINFER_AVX2_FN(dot_avx2<Rows<Q5_1Block>>),
     dequant_offset<kQ5_1Bytes, true>, PPINFER_AVX2_FN(dot_rows_avx2<Rows<Q5_1Block>>),
     PPINFER_AVX2_FN(dot_weight_rows_avx2<Q5_1Block>)},
    {8, kBlock, kQ8_0Bytes, dot_q8_0_scalar, PPINFER_AVX2_FN(dot_avx2<Rows<Q8_0Block>>), dequant_q8_0,
     PPINFER_AVX2_FN(dot_rows_avx2<Rows<Q8_0Block>>),
     PPINFER_AVX2_FN(dot_weight_rows_avx2<Q8_0Block>)},
};
const int kLegacyKernelCount = sizeof(kLegacyKernels) / sizeof(kLegacyKernels[0]);

}  // namespace ppinfer
