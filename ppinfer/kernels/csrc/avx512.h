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

}  // namespace avx512
}  // namespace ppinfer

#endif  // PPINFER_HAS_AVX512
