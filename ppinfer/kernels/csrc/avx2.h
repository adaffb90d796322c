// AVX2 pieces shared by the per-type kernels (legacy.cpp, kquants.cpp): the lane reductions and
// loads that put one output's chain in each lane (qtypes.h, "the AVX2 dots").
#pragma once

#include "qtypes.h"

#if defined(PPINFER_X86)

namespace ppinfer {
namespace avx2 {

PPINFER_AVX2 inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Lane sums of two vectors: even lanes hold a's pair sums, odd lanes b's
// ([a0+a1, b0+b1, a2+a3, b2+b3 | a4+a5, b4+b5, a6+a7, b6+b7]).
PPINFER_AVX2 inline __m256i pair_sums(__m256i a, __m256i b) {
  const __m256i ab = _mm256_blend_epi32(a, b, 0xAA);  // [a0 b1 a2 b3 ...]
  const __m256i ba = _mm256_blend_epi32(b, a, 0xAA);  // [b0 a1 b2 a3 ...]
  return _mm256_add_epi32(ab, _mm256_shuffle_epi32(ba, 0xB1));
}

// Two pair_sums results to [a0123, b0123, c0123, d0123 | a4567, b4567, c4567, d4567].
PPINFER_AVX2 inline __m256i quad_sums(__m256i ab, __m256i cd) {
  const __m256i x = _mm256_blend_epi32(ab, cd, 0xCC);
  const __m256i y = _mm256_blend_epi32(cd, ab, 0xCC);
  return _mm256_add_epi32(x, _mm256_shuffle_epi32(y, 0x4E));
}

PPINFER_AVX2 inline __m256i ones16() { return _mm256_set1_epi16(1); }

// pair_sums of madd(a, ones) and madd(b, ones) for int16 lanes a, b, adding pairs of int16 lanes
// before the madd (so one madd for both): each lane must stay within int16 when two are added.
PPINFER_AVX2 inline __m256i pair_sums16(__m256i a, __m256i b) {
  const __m256i ab = _mm256_blend_epi32(a, b, 0xAA);
  const __m256i ba = _mm256_blend_epi32(b, a, 0xAA);
  return _mm256_madd_epi16(_mm256_add_epi16(ab, _mm256_shuffle_epi32(ba, 0xB1)), ones16());
}

PPINFER_AVX2 inline __m256i octet_sums(__m256i abcd, __m256i efgh) {
  return _mm256_add_epi32(_mm256_blend_epi32(abcd, efgh, 0xF0), _mm256_permute2x128_si256(abcd, efgh, 0x21));
}

// ---- the integer dots: unsigned code bytes u times signed x bytes s ----
// Dot::products(u, s) holds each 4 products u[4i..4i+3] s[4i..4i+3] of int32 lane i, summed
// (Dot::widen gives that sum in int32); Dot::add(sum, u, s) adds them to a sum of such vectors;
// Dot::pair_sums is pair_sums for them. Both dots give the same exact integers wherever
// MaddubsDot's int16 lanes stay in range (each kernel says why they do), so a kernel over
// either gives the same bits.

// AVX2: maddubs's int16 pair sums (int16 lanes; sums of them must stay within int16), widened
// to int32 by madd.
struct MaddubsDot {
  static constexpr bool kInt16 = true;  // products and their sums are int16 lanes
  PPINFER_AVX2 static __m256i products(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
  PPINFER_AVX2 static __m256i add(__m256i sum, __m256i u, __m256i s) { return _mm256_add_epi16(sum, products(u, s)); }
  PPINFER_AVX2 static __m256i widen(__m256i sum) { return _mm256_madd_epi16(sum, ones16()); }
  PPINFER_AVX2 static __m256i pair_sums(__m256i a, __m256i b) { return pair_sums16(a, b); }
  // sum (int32 lanes) plus widen(products(u, s)).
  PPINFER_AVX2 static __m256i add32(__m256i sum, __m256i u, __m256i s) {
    return _mm256_add_epi32(sum, widen(products(u, s)));
  }
  // widen(sum) times scale16's int16 lanes (the same scale in both of each int32 lane).
  PPINFER_AVX2 static __m256i widen_scaled(__m256i sum, __m256i scale16) { return _mm256_madd_epi16(sum, scale16); }
};

#if defined(PPINFER_HAS_AVXVNNI)
// AVX-VNNI: dpbusd adds the 4 products to the int32 lane (exact).
struct VnniDot {
  static constexpr bool kInt16 = false;
  PPINFER_AVXVNNI static __m256i add(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(sum, u, s); }
  PPINFER_AVXVNNI static __m256i products(__m256i u, __m256i s) { return add(_mm256_setzero_si256(), u, s); }
  PPINFER_AVXVNNI static __m256i widen(__m256i sum) { return sum; }
  PPINFER_AVXVNNI static __m256i pair_sums(__m256i a, __m256i b) { return avx2::pair_sums(a, b); }
  PPINFER_AVXVNNI static __m256i add32(__m256i sum, __m256i u, __m256i s) { return add(sum, u, s); }
  // sum times the int16 scale in the low half of each int32 lane of scale16, sign-extended.
  PPINFER_AVXVNNI static __m256i widen_scaled(__m256i sum, __m256i scale16) {
    return _mm256_mullo_epi32(sum, _mm256_srai_epi32(_mm256_slli_epi32(scale16, 16), 16));
  }
};

// Kernel's entry points compiled for AVX-VNNI (Kernel: an AVX2 kernel over VnniDot), each
// forwarding to Kernel's function of the same name.
template <class Kernel>
struct OnAvxVnni {
  template <int kN, class... Args>
  PPINFER_AVXVNNI_ENTRY static void run(Args... args) { Kernel::template run<kN>(args...); }
  template <int kN, class... Args>
  PPINFER_AVXVNNI_ENTRY static void weight_rows(Args... args) { Kernel::template weight_rows<kN>(args...); }
  template <int kN, class... Args>
  PPINFER_AVXVNNI_ENTRY static void tile(Args... args) { Kernel::template tile<kN>(args...); }
  template <class... Args>
  PPINFER_AVXVNNI_ENTRY static void pair_tile(Args... args) { Kernel::pair_tile(args...); }
};
#endif

// [sum of p[0]'s lanes, ..., sum of p[7]'s lanes] in int32 (exact), for Dot::products p[j].
template <class Dot>
PPINFER_AVX2 inline __m256i product_sums8(const __m256i* p) {
  return octet_sums(quad_sums(Dot::pair_sums(p[0], p[1]), Dot::pair_sums(p[2], p[3])),
                    quad_sums(Dot::pair_sums(p[4], p[5]), Dot::pair_sums(p[6], p[7])));
}

// The same for int32 lanes p[j].
PPINFER_AVX2 inline __m256i lane_sums8(const __m256i* p) {
  return octet_sums(quad_sums(pair_sums(p[0], p[1]), pair_sums(p[2], p[3])),
                    quad_sums(pair_sums(p[4], p[5]), pair_sums(p[6], p[7])));
}

// The same for int16 lanes p[j] (maddubs products) whose pairs add up within int16.
PPINFER_AVX2 inline __m256i lane_sums8_16(const __m256i* p) { return product_sums8<MaddubsDot>(p); }

// Transposes 8 vectors of 8 floats: v[i] lane j becomes v[j] lane i.
PPINFER_AVX2 inline void transpose8(__m256* v) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);  // [v_i0 v_i+1,0 v_i1 v_i+1,1 | lanes 4, 5]
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], 0x44);
      u[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], 0xEE);
    }
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    v[j + 4] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Asks for the kBytes-byte weight block `ahead` bytes past p to be loaded into the caches
// (nothing where ahead is 0), without waiting: the address may lie past the weights.
template <int kBytes>
PPINFER_AVX2 inline void prefetch_block(const uint8_t* p, int64_t ahead) {
  if (ahead == 0) return;
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead);
  for (int i = 0; i < kBytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(at + i), _MM_HINT_T0);
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The fp16 at rows[j] + offset, for j < 8, as 8 floats.
PPINFER_AVX2 inline __m256 halves8(const uint8_t* const* rows, int64_t offset) {
  const __m128i h = _mm_setr_epi16(load_u16(rows[0] + offset), load_u16(rows[1] + offset), load_u16(rows[2] + offset),
                                   load_u16(rows[3] + offset), load_u16(rows[4] + offset), load_u16(rows[5] + offset),
                                   load_u16(rows[6] + offset), load_u16(rows[7] + offset));
  return _mm256_cvtph_ps(h);
}

// The two fp16 at rows[j] + offset (a block's d and m), for j < 8: [first ones], [second ones].
PPINFER_AVX2 inline void half_pairs8(const uint8_t* const* rows, int64_t offset, __m256* first, __m256* second) {
  int32_t pair[8];
  for (int j = 0; j < 8; ++j) std::memcpy(&pair[j], rows[j] + offset, sizeof pair[j]);
  const __m256i both = _mm256_setr_epi32(pair[0], pair[1], pair[2], pair[3], pair[4], pair[5], pair[6], pair[7]);
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(both));       // [d0 m0 d1 m1 | d2 m2 d3 m3]
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(both, 1));  // rows 4..7
  // shuffle_ps gives rows [0 1 4 5 | 2 3 6 7]; the 64-bit permute restores the order.
  *first = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
  *second = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
}

// The fp16 at p, in all 8 lanes.
PPINFER_AVX2 inline __m256 broadcast_half(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<int16_t>(load_u16(p))));
}

// Dword t (0..7) of v in all 8 lanes, given lo = v's low 128 bits in both halves and hi = its
// high 128 bits in both halves: 4 bytes of codes against one 4-byte group of a Q8Tile.
template <int kT>
PPINFER_AVX2 inline __m256i dword(__m256i lo, __m256i hi) {
  return _mm256_shuffle_epi32(kT < 4 ? lo : hi, (kT % 4) * 0x55);
}

// v's low / high 128 bits in both halves.
PPINFER_AVX2 inline __m256i low_twice(__m256i v) { return _mm256_permute2x128_si256(v, v, 0x00); }
PPINFER_AVX2 inline __m256i high_twice(__m256i v) { return _mm256_permute2x128_si256(v, v, 0x11); }

// ---- the two lane layouts of the tile kernels ----
// Q8Tile: lane r is x row r, against one weight row. Q8Tile4: lanes r and 4 + r are x row r,
// against weight rows a (lanes 0-3) and b (lanes 4-7), b's bytes `delta` past a's. A tile kernel
// computes what it needs of each weight row as a vector (the same in both 128-bit halves, as for
// one row) and `mix`es them: the halves of one vector then come from rows a and b.
template <class XTile>
struct Layout;

template <>
struct Layout<Q8Tile> {
  static constexpr int kWeightRows = 1;
  int64_t delta;  // unused: one weight row

  PPINFER_AVX2 static __m256i mix(const __m256i* v) { return v[0]; }
  PPINFER_AVX2 static __m256 mix(const __m256* v) { return v[0]; }
  PPINFER_AVX2 static __m256i q(const Q8Tile& x, int t) { return load256(x.q[t]); }
  PPINFER_AVX2 static __m256 d(const Q8Tile& x) { return _mm256_load_ps(x.d); }
  PPINFER_AVX2 static __m256 s(const Q8Tile& x) { return _mm256_load_ps(x.s); }
  PPINFER_AVX2 static __m256i half_sums(const Q8Tile& x) { return load256(x.half_sums); }
  // The 16 weight bytes at p in both halves; the fp16 at p in all lanes.
  PPINFER_AVX2 __m256i bytes16(const uint8_t* p) const {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  PPINFER_AVX2 __m256 half(const uint8_t* p) const { return broadcast_half(p); }
};

template <>
struct Layout<Q8Tile4> {
  static constexpr int kWeightRows = 2;
  int64_t delta;  // row b's bytes past row a's

  PPINFER_AVX2 static __m256i mix(const __m256i* v) { return _mm256_blend_epi32(v[0], v[1], 0xF0); }
  PPINFER_AVX2 static __m256 mix(const __m256* v) { return _mm256_blend_ps(v[0], v[1], 0xF0); }
  PPINFER_AVX2 static __m256i twice(const void* p) {
    return _mm256_broadcastsi128_si256(_mm_load_si128(static_cast<const __m128i*>(p)));
  }
  PPINFER_AVX2 static __m256i q(const Q8Tile4& x, int t) { return twice(x.q[t]); }
  PPINFER_AVX2 static __m256 d(const Q8Tile4& x) { return _mm256_castsi256_ps(twice(x.d)); }
  PPINFER_AVX2 static __m256 s(const Q8Tile4& x) { return _mm256_castsi256_ps(twice(x.s)); }
  PPINFER_AVX2 static __m256i half_sums(const Q8Tile4& x) { return twice(x.half_sums); }
  // Row a's 16 bytes at p, then row b's; row a's fp16 at p in lanes 0-3, row b's in lanes 4-7.
  PPINFER_AVX2 __m256i bytes16(const uint8_t* p) const {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + delta));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
  }
  PPINFER_AVX2 __m256 half(const uint8_t* p) const {
    return _mm256_blend_ps(broadcast_half(p), broadcast_half(p + delta), 0xF0);
  }
};

// Layout<XTile>::bytes16 as a function object.
template <class XTile>
struct Bytes16 {
  Layout<XTile> layout;
  PPINFER_AVX2 __m256i operator()(const uint8_t* p) const { return layout.bytes16(p); }
};

// The sum over t in [kFirst, kLast) of Dot::products(dword t of the codes, tile.q[t]): each
// int32 lane holds its x row's products with codes 4t..4t+3 (MaddubsDot: in its two int16
// lanes, whose sums the caller keeps in range).
template <int kFirst, int kLast, class Dot = MaddubsDot, class XTile>
PPINFER_AVX2 inline __m256i tile_products(__m256i lo, __m256i hi, const XTile& x) {
  const __m256i codes = dword<kFirst>(lo, hi), xq = Layout<XTile>::q(x, kFirst);
  if constexpr (kFirst + 1 == kLast) {
    return Dot::products(codes, xq);
  } else {
    return Dot::add(tile_products<kFirst + 1, kLast, Dot>(lo, hi, x), codes, xq);
  }
}

// The same summed in int32, times scale16 (Dot::widen_scaled), kInt16Groups groups at a time
// where Dot's sums are int16 (the most that stay in range), all at once otherwise.
template <int kFirst, int kLast, int kInt16Groups, class Dot, class XTile>
PPINFER_AVX2 inline __m256i scaled_tile_sum(__m256i lo, __m256i hi, const XTile& x, __m256i scale16) {
  if constexpr (!Dot::kInt16 || kLast - kFirst <= kInt16Groups) {
    return Dot::widen_scaled(tile_products<kFirst, kLast, Dot>(lo, hi, x), scale16);
  } else {
    constexpr int kMid = kFirst + kInt16Groups;
    return _mm256_add_epi32(Dot::widen_scaled(tile_products<kFirst, kMid, Dot>(lo, hi, x), scale16),
                            scaled_tile_sum<kMid, kLast, kInt16Groups, Dot>(lo, hi, x, scale16));
  }
}

// The two tile entry points of a kernel whose `run<kGroups>(layout, w, x, stride, k, acc, ahead)`
// serves both: one weight row against kGroups groups of 8 x rows, or two against 4.
template <class Kernel>
struct TileEntries {
  template <int kGroups>
  PPINFER_AVX2 static void tile(const uint8_t* w, const Q8Tile* x, int64_t stride, int k, float* acc, int64_t ahead) {
    Kernel::template run<kGroups>(Layout<Q8Tile>{0}, w, x, stride, k, acc, ahead);
  }
  PPINFER_AVX2 static void pair_tile(const uint8_t* w, int64_t w_stride, const Q8Tile4* x, int k, float* acc,
                                     int64_t ahead) {
    Kernel::template run<1>(Layout<Q8Tile4>{w_stride}, w, x, 0, k, acc, ahead);
  }
};

}  // namespace avx2
}  // namespace ppinfer

#endif  // PPINFER_X86
