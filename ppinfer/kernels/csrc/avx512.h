// AVX-512 pieces shared by the per-type tile16 kernels (legacy.cpp, kquants.cpp): one weight row
// against groups of 16 x rows, lane r of each 512-bit vector x row r (qtypes.h: Q8Tile16).
//
// A weight block's 32 codes are decoded once into 8 dwords of unsigned bytes; each dword t is
// broadcast against the tile's vector t (values 4t .. 4t+3 of the 16 x rows) and VNNI's
// dpbusd adds the four products to each lane's int32: the block's integer dot, exact, in 8
// instructions for 16 x rows. The float update that follows is the AVX2 kernels' (written next
// to each type's), lane for lane, so a row's result is the same bits on either code path.
#pragma once

#include "qtypes.h"

#if defined(PPINFER_HAS_AVX512)

namespace ppinfer {
namespace avx512 {

// 32 unsigned codes, 4 per dword, in value order.
struct alignas(32) Codes {
  uint32_t dword[kQ8Elems / 4];
};

// Lane r: sum over dwords t in [kFirst, kLast) of codes t . x row r's values 4t .. 4t+3.
template <int kFirst, int kLast>
PPINFER_AVX512 inline __m512i isum(const Codes& c, const Q8Tile16& x) {
  __m512i sum = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int t = kFirst; t < kLast; ++t) {
    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(static_cast<int32_t>(c.dword[t])), _mm512_load_si512(x.q[t]));
  }
  return sum;
}

PPINFER_AVX512 inline __m512 d(const Q8Tile16& x) { return _mm512_load_ps(x.d); }
PPINFER_AVX512 inline __m512 s(const Q8Tile16& x) { return _mm512_load_ps(x.s); }
PPINFER_AVX512 inline __m512i half_sum(const Q8Tile16& x, int h) { return _mm512_load_si512(x.half_sums[h]); }

// The fp16 at p in all 16 lanes.
PPINFER_AVX512 inline __m512 half(const uint8_t* p) { return _mm512_set1_ps(load_fp16(p)); }

// Asks for the kBytes-byte weight block `ahead` bytes past p (nothing where ahead is 0).
template <int kBytes>
PPINFER_AVX512 inline void prefetch_block(const uint8_t* p, int64_t ahead) {
  if (ahead == 0) return;
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead);
  for (int i = 0; i < kBytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(at + i), _MM_HINT_T0);
}

// 32 codes from 16 bytes qs: low nibbles are values 0..15, high nibbles 16..31.
PPINFER_AVX512 inline __m256i nibble_codes(const uint8_t* qs) {
  const __m128i both = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm256_setr_m128i(_mm_and_si128(both, low4), _mm_and_si128(_mm_srli_epi16(both, 4), low4));
}

// 16 in byte j where bit j of the little-endian uint32 at qh is set (the fifth bits), else 0.
PPINFER_AVX512 inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, sizeof bits);
  return _mm256_maskz_mov_epi8(static_cast<__mmask32>(bits), _mm256_set1_epi8(0x10));
}

PPINFER_AVX512 inline void store(__m256i codes, Codes* out) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(out->dword), codes);
}

// ---- weight rows: 8 weight rows against one x row (qtypes.h: DotWeightRowsFn) ----
//
// Weight rows j and j + 4 share 512-bit vector j (j < 4): row j's 32 codes of a block in the low
// 256 bits, row j + 4's in the high ones, in value order, against the x block's 32 values in
// both halves. dpbusd leaves 8 int32 partial sums per row, and row_sums8 adds each row's up
// (exact): the block's integer dot for row j in lane j, the lanes the AVX2 weight-rows kernels
// update, with their float operations.

// An x block's 32 values in both 256-bit halves.
PPINFER_AVX512 inline __m512i x_twice(const int8_t* q) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}

// Row pair (a, b) codes from the 16 nibble bytes at qa and qb: values 0..15 are the low
// nibbles, 16..31 the high ones.
PPINFER_AVX512 inline __m512i pair_nibble_codes(const uint8_t* qa, const uint8_t* qb) {
  const __m512i a = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa)));
  const __m512i ab = _mm512_mask_broadcast_i32x4(a, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
  // 128-bit lanes [a, a >> 4, b, b >> 4]: the int16 lanes 8..15 and 24..31 shift.
  const __m512i shifted = _mm512_mask_srli_epi16(ab, 0xFF00FF00u, ab, 4);
  return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

// 16 in byte j of row a's half (j < 32) where bit j of the little-endian uint32 at ha is set,
// and likewise for row b at hb in bytes 32..63: the fifth bits of a row pair.
PPINFER_AVX512 inline __m512i pair_fifth_bits(const uint8_t* ha, const uint8_t* hb) {
  uint32_t a, b;
  std::memcpy(&a, ha, sizeof a);
  std::memcpy(&b, hb, sizeof b);
  const __mmask64 set = static_cast<__mmask64>(a) | (static_cast<__mmask64>(b) << 32);
  return _mm512_maskz_mov_epi8(set, _mm512_set1_epi8(0x10));
}

// The 32 bytes at pa (low half) and pb (high half).
PPINFER_AVX512 inline __m512i pair_bytes32(const uint8_t* pa, const uint8_t* pb) {
  const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa)));
  return _mm512_inserti64x4(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb)), 1);
}

// Lane sums of two vectors: even int32 lanes a's pair sums, odd lanes b's.
PPINFER_AVX512 inline __m512i pair_sums(__m512i a, __m512i b) {
  const __m512i ab = _mm512_mask_blend_epi32(0xAAAA, a, b);  // [a0 b1 a2 b3 ...]
  const __m512i ba = _mm512_mask_blend_epi32(0xAAAA, b, a);  // [b0 a1 b2 a3 ...]
  return _mm512_add_epi32(ab, _mm512_shuffle_epi32(ba, _MM_PERM_CDAB));
}

// Two pair_sums results to [a0123, b0123, c0123, d0123] in each 128-bit lane.
PPINFER_AVX512 inline __m512i quad_sums(__m512i ab, __m512i cd) {
  const __m512i x = _mm512_mask_blend_epi32(0xCCCC, ab, cd);
  const __m512i y = _mm512_mask_blend_epi32(0xCCCC, cd, ab);
  return _mm512_add_epi32(x, _mm512_shuffle_epi32(y, _MM_PERM_BADC));
}

// [sum of row 0's 8 int32, ..., row 7's] from the row pair vectors p[j] (rows j, j + 4).
PPINFER_AVX512 inline __m256i row_sums8(const __m512i* p) {
  // 128-bit lane L of q: rows 0..3 (L = 0, 1) or 4..7 (L = 2, 3), their int32 4 (L % 2) .. +3.
  const __m512i q = quad_sums(pair_sums(p[0], p[1]), pair_sums(p[2], p[3]));
  const __m512i lanes0213 = _mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(3, 1, 2, 0));
  return _mm256_add_epi32(_mm512_castsi512_si256(lanes0213), _mm512_extracti64x4_epi64(lanes0213, 1));
}

}  // namespace avx512
}  // namespace ppinfer

#endif  // PPINFER_HAS_AVX512
