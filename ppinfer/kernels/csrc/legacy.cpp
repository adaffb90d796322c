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

#include "avx2.h"
#include "avx512.h"
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

// One output's chain (qtypes.h), per block with f = float(sum(q * qx)), x ~= dx * qx and
// s = dx * sum(qx):
//   Q4_0 / Q5_0 (w = d (q - o), o = 8 / 16):  acc = fma(d, fma(dx, f, -(o s)), acc)  (o s is exact)
//   Q4_1 / Q5_1 (w = d q + m):                acc = fma(m, s, fma(d * dx, f, acc))
//   Q8_0 (w = d q):                           acc = fma(d, dx * f, acc)
// Each kind of block below has row_codes (a block's codes in value order) and row_products
// (lanes summing to their integer dot with one activation block: Dot::products where
// kNarrowProducts, else int32), the block's decoding for tiles (its codes twice over, see
// avx2::dword) and tile_isum (x row r's integer dot in lane r), and the two forms of its update:
// rows (lanes = weight rows, scales gathered by row_scales) and tile (lanes = x rows, see
// avx2::Layout). The integer dots are Dot's (avx2.h: MaddubsDot, or VnniDot for AVX-VNNI).

using avx2::load256;

// 32 four-bit codes from 16 bytes qs (low nibbles: values 0..15), in value order.
PPINFER_AVX2 inline __m256i nibbles(const uint8_t* qs) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  const __m256i shifted = _mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

// Which of the 4 qh bytes each byte of fifth_bits reads, 8 bytes per qh byte: values 0..31 in
// value order, or values 0..15 (16..31) in both halves.
enum class FifthBits { kInOrder, kLowTwice, kHighTwice };

// 16 in each byte whose value's fifth bit (bit j of qh for value j) is set, else 0.
PPINFER_AVX2 inline __m256i fifth_bits(const uint8_t* qh, FifthBits order) {
  uint32_t bits;
  std::memcpy(&bits, qh, sizeof bits);
  constexpr int64_t k0 = 0, k1 = 0x0101010101010101LL, k2 = 0x0202020202020202LL, k3 = 0x0303030303030303LL;
  const __m256i pick = order == FifthBits::kInOrder    ? _mm256_set_epi64x(k3, k2, k1, k0)
                       : order == FifthBits::kLowTwice ? _mm256_set_epi64x(k1, k0, k1, k0)
                                                       : _mm256_set_epi64x(k3, k2, k3, k2);
  // byte j takes the qh byte holding its bit, then keeps only bit j % 8 of it.
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), pick);
  const __m256i other_bits = _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFELL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, other_bits), _mm256_set1_epi8(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// The fp16 scales of block b of 8 weight rows, lane j for row j: d, and m where the type has it.
struct RowScales {
  __m256 d, m;
};

// A decoded weight block for tiles: codes 0..15 (lo) and 16..31 (hi), each in both halves
// (with two weight rows, row a's in the low halves, b's in the high ones: avx2::Layout).
struct TwiceCodes {
  __m256i lo, hi;
};

// The 4- and 5-bit kinds: qs are the block's last 16 bytes, qh (5-bit) starts at kQhAt.
template <int kBytes_, int kQhAt>
struct UnsignedCodes {
  static constexpr int kBytes = kBytes_;
  static constexpr int kQsAt = kBytes - kHalf;

  PPINFER_AVX2 static __m256i row_codes(const uint8_t* w) {
    const __m256i q = nibbles(w + kQsAt);
    if constexpr (kQhAt >= 0) return _mm256_or_si256(q, fifth_bits(w + kQhAt, FifthBits::kInOrder));
    return q;
  }
  // MaddubsDot's int16 lanes are at most 2 * 31 * 127: two of them add up within int16.
  static constexpr bool kNarrowProducts = true;
  template <class Dot>
  PPINFER_AVX2 static __m256i row_products(__m256i q, __m256i y) { return Dot::products(q, y); }
  template <class XTile>
  PPINFER_AVX2 static TwiceCodes decode(const avx2::Layout<XTile>& layout, const uint8_t* w) {
    const __m256i both = layout.bytes16(w + kQsAt);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    TwiceCodes c{_mm256_and_si256(both, low4), _mm256_and_si256(_mm256_srli_epi16(both, 4), low4)};
    if constexpr (kQhAt >= 0) {
      __m256i lo[avx2::Layout<XTile>::kWeightRows], hi[avx2::Layout<XTile>::kWeightRows];
      for (int i = 0; i < avx2::Layout<XTile>::kWeightRows; ++i) {
        lo[i] = fifth_bits(w + i * layout.delta + kQhAt, FifthBits::kLowTwice);
        hi[i] = fifth_bits(w + i * layout.delta + kQhAt, FifthBits::kHighTwice);
      }
      c.lo = _mm256_or_si256(c.lo, layout.mix(lo));
      c.hi = _mm256_or_si256(c.hi, layout.mix(hi));
    }
    return c;
  }
  // MaddubsDot's products with codes <= 15 stay within int16 for all 8 groups of 4, with codes
  // <= 31 for 4.
  template <class Dot, class XTile>
  PPINFER_AVX2 static __m256i tile_isum(const TwiceCodes& c, const XTile& x) {
    if constexpr (kQhAt < 0) {
      return Dot::widen(avx2::tile_products<0, 8, Dot>(c.lo, c.hi, x));
    } else {
      return _mm256_add_epi32(Dot::widen(avx2::tile_products<0, 4, Dot>(c.lo, c.hi, x)),
                              Dot::widen(avx2::tile_products<4, 8, Dot>(c.lo, c.hi, x)));
    }
  }
};

// Q4_0 / Q5_0: w = d (q - kOffset).
template <int kBytes_, int kOffset, int kQhAt>
struct SymmetricBlock : UnsignedCodes<kBytes_, kQhAt> {
  PPINFER_AVX2 static RowScales row_scales(const uint8_t* const* rows, int64_t at) {
    return {avx2::halves8(rows, at), _mm256_setzero_ps()};
  }
  PPINFER_AVX2 static __m256 update_rows(const RowScales& w, __m256 f, const Q8Block& x, __m256 acc) {
    const __m256 t = _mm256_fmsub_ps(_mm256_set1_ps(x.d), f, _mm256_set1_ps(x.s * kOffset));
    return _mm256_fmadd_ps(w.d, t, acc);
  }
  template <class XTile>
  PPINFER_AVX2 static __m256 update_tile(const avx2::Layout<XTile>& layout, const uint8_t* w, __m256 f,
                                         const XTile& x, __m256 acc) {
    using L = avx2::Layout<XTile>;
    const __m256 os = _mm256_mul_ps(L::s(x), _mm256_set1_ps(kOffset));
    return _mm256_fmadd_ps(layout.half(w), _mm256_fmsub_ps(L::d(x), f, os), acc);
  }
};

// Q4_1 / Q5_1: w = d q + m (d, m: the block's first two fp16).
template <int kBytes_, int kQhAt>
struct OffsetBlock : UnsignedCodes<kBytes_, kQhAt> {
  PPINFER_AVX2 static RowScales row_scales(const uint8_t* const* rows, int64_t at) {
    RowScales w;
    avx2::half_pairs8(rows, at, &w.d, &w.m);
    return w;
  }
  PPINFER_AVX2 static __m256 update_rows(const RowScales& w, __m256 f, const Q8Block& x, __m256 acc) {
    const __m256 ddx = _mm256_mul_ps(w.d, _mm256_set1_ps(x.d));
    return _mm256_fmadd_ps(w.m, _mm256_set1_ps(x.s), _mm256_fmadd_ps(ddx, f, acc));
  }
  template <class XTile>
  PPINFER_AVX2 static __m256 update_tile(const avx2::Layout<XTile>& layout, const uint8_t* w, __m256 f,
                                         const XTile& x, __m256 acc) {
    using L = avx2::Layout<XTile>;
    const __m256 ddx = _mm256_mul_ps(layout.half(w), L::d(x));
    return _mm256_fmadd_ps(layout.half(w + 2), L::s(x), _mm256_fmadd_ps(ddx, f, acc));
  }
};

// Q8_0: w = d q, q signed: |q| against qx with q's sign (|pair sums| <= 2 * 128 * 127, so
// each group of 4 goes to int32 on its own).
struct Q8_0Block {
  static constexpr int kBytes = kQ8_0Bytes;
  struct Codes {
    TwiceCodes q, abs_q;
  };

  PPINFER_AVX2 static __m256i row_codes(const uint8_t* w) { return load256(w + 2); }
  static constexpr bool kNarrowProducts = false;  // int32 lanes
  template <class Dot>
  PPINFER_AVX2 static __m256i row_products(__m256i q, __m256i y) {
    return Dot::widen(Dot::products(_mm256_abs_epi8(q), _mm256_sign_epi8(y, q)));
  }
  template <class XTile>
  PPINFER_AVX2 static Codes decode(const avx2::Layout<XTile>& layout, const uint8_t* w) {
    const TwiceCodes q{layout.bytes16(w + 2), layout.bytes16(w + 2 + kHalf)};
    return {q, {_mm256_abs_epi8(q.lo), _mm256_abs_epi8(q.hi)}};
  }
  template <int kT, class Dot, class XTile>
  PPINFER_AVX2 static __m256i group_isum(const Codes& c, const XTile& x) {
    const __m256i q = avx2::dword<kT>(c.q.lo, c.q.hi);
    const __m256i signed_x = _mm256_sign_epi8(avx2::Layout<XTile>::q(x, kT), q);
    const __m256i abs_q = avx2::dword<kT>(c.abs_q.lo, c.abs_q.hi);
    if constexpr (kT + 1 < kQ8Elems / 4) return Dot::add32(group_isum<kT + 1, Dot>(c, x), abs_q, signed_x);
    return Dot::widen(Dot::products(abs_q, signed_x));
  }
  template <class Dot, class XTile>
  PPINFER_AVX2 static __m256i tile_isum(const Codes& c, const XTile& x) { return group_isum<0, Dot>(c, x); }
  PPINFER_AVX2 static RowScales row_scales(const uint8_t* const* rows, int64_t at) {
    return {avx2::halves8(rows, at), _mm256_setzero_ps()};
  }
  PPINFER_AVX2 static __m256 update_rows(const RowScales& w, __m256 f, const Q8Block& x, __m256 acc) {
    return _mm256_fmadd_ps(w.d, _mm256_mul_ps(_mm256_set1_ps(x.d), f), acc);
  }
  template <class XTile>
  PPINFER_AVX2 static __m256 update_tile(const avx2::Layout<XTile>& layout, const uint8_t* w, __m256 f,
                                         const XTile& x, __m256 acc) {
    return _mm256_fmadd_ps(layout.half(w), _mm256_mul_ps(avx2::Layout<XTile>::d(x), f), acc);
  }
};

// 8 weight rows against kXRows x rows: lane j of x row m's vector is weight row j's chain.
// Each weight block is decoded once for all of them.
template <class Block, class Dot>
struct WeightRows {
  template <int kXRows>
  PPINFER_AVX2 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                       float* acc_io, int64_t ahead) {
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int b = 0; b < k / kBlock; ++b) {
      const int64_t at = int64_t{b} * Block::kBytes;
      __m256i y[kXRows], p[kXRows][kLanes];
      for (int m = 0; m < kXRows; ++m) y[m] = load256(x[m * x_stride + b].q);
      for (int j = 0; j < kLanes; ++j) {
        avx2::prefetch_block<Block::kBytes>(rows[j] + at, ahead);
        const __m256i q = Block::row_codes(rows[j] + at);
        for (int m = 0; m < kXRows; ++m) p[m][j] = Block::template row_products<Dot>(q, y[m]);
      }
      const RowScales scales = Block::row_scales(rows, at);
      for (int m = 0; m < kXRows; ++m) {
        const __m256i isum = Block::kNarrowProducts ? avx2::product_sums8<Dot>(p[m]) : avx2::lane_sums8(p[m]);
        acc[m] = Block::update_rows(scales, _mm256_cvtepi32_ps(isum), x[m * x_stride + b], acc[m]);
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }
};

// Tiles: one weight row against kGroups groups of 8 x rows (lane r of acc[g]: x row 8g + r), or
// two weight rows against 4 x rows (pair_tile). Each weight block is decoded once for all of them.
template <class Block, class Dot>
struct Tile : avx2::TileEntries<Tile<Block, Dot>> {
  template <int kGroups, class XTile>
  PPINFER_AVX2 static void run(const avx2::Layout<XTile>& layout, const uint8_t* w, const XTile* x, int64_t stride,
                               int k, float* acc_io, int64_t ahead) {
    __m256 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm256_loadu_ps(acc_io + g * kLanes);
    for (int b = 0; b < k / kBlock; ++b, w += Block::kBytes) {
      for (int i = 0; i < avx2::Layout<XTile>::kWeightRows; ++i) {
        avx2::prefetch_block<Block::kBytes>(w + i * layout.delta, ahead);
      }
      const auto codes = Block::decode(layout, w);
      for (int g = 0; g < kGroups; ++g) {
        const XTile& xt = x[g * stride + b];
        const __m256i isum = Block::template tile_isum<Dot>(codes, xt);
        acc[g] = Block::update_tile(layout, w, _mm256_cvtepi32_ps(isum), xt, acc[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) _mm256_storeu_ps(acc_io + g * kLanes, acc[g]);
  }
};

using Q4_0Block = SymmetricBlock<kQ4_0Bytes, 8, -1>;
using Q5_0Block = SymmetricBlock<kQ5_0Bytes, 16, 2>;
using Q4_1Block = OffsetBlock<kQ4_1Bytes, -1>;
using Q5_1Block = OffsetBlock<kQ5_1Bytes, 4>;

#endif  // PPINFER_X86

// ---- AVX-512 (VNNI) ------------------------------------------------------------------------
#if defined(PPINFER_HAS_AVX512)

// The tile16 kernels (avx512.h): per block, its codes as unsigned bytes, each x row's exact
// integer dot with them, and the AVX2 tile update of the chain above in 16 lanes.
template <int kBytes, int kQhAt>
struct Codes16 {
  static constexpr int kBlockBytes = kBytes;
  PPINFER_AVX512 static void decode(const uint8_t* w, avx512::Codes* c) {
    __m256i q = avx512::nibble_codes(w + kBytes - kHalf);
    if constexpr (kQhAt >= 0) q = _mm256_or_si256(q, avx512::fifth_bits(w + kQhAt));
    avx512::store(q, c);
  }
  PPINFER_AVX512 static __m512i isum(const avx512::Codes& c, const Q8Tile16& x) { return avx512::isum<0, 8>(c, x); }
};

// Q4_0 / Q5_0: acc = fma(d, fma(dx, f, -(o s)), acc).
template <int kBytes, int kOffset, int kQhAt>
struct Symmetric16 : Codes16<kBytes, kQhAt> {
  PPINFER_AVX512 static __m512 update(const uint8_t* w, __m512 f, const Q8Tile16& x, __m512 acc) {
    const __m512 os = _mm512_mul_ps(avx512::s(x), _mm512_set1_ps(kOffset));
    return _mm512_fmadd_ps(avx512::half(w), _mm512_fmsub_ps(avx512::d(x), f, os), acc);
  }
};

// Q4_1 / Q5_1: acc = fma(m, s, fma(d * dx, f, acc)).
template <int kBytes, int kQhAt>
struct Offset16 : Codes16<kBytes, kQhAt> {
  PPINFER_AVX512 static __m512 update(const uint8_t* w, __m512 f, const Q8Tile16& x, __m512 acc) {
    const __m512 ddx = _mm512_mul_ps(avx512::half(w), avx512::d(x));
    return _mm512_fmadd_ps(avx512::half(w + 2), avx512::s(x), _mm512_fmadd_ps(ddx, f, acc));
  }
};

// Q8_0: acc = fma(d, dx * f, acc). dpbusd takes unsigned weight bytes, so the codes go in as
// q + 128 (q xor 0x80) and 128 sum(qx) comes off the integer sum again.
struct Q8_0Block16 {
  static constexpr int kBlockBytes = kQ8_0Bytes;
  PPINFER_AVX512 static void decode(const uint8_t* w, avx512::Codes* c) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    avx512::store(_mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80))), c);
  }
  PPINFER_AVX512 static __m512i isum(const avx512::Codes& c, const Q8Tile16& x) {
    const __m512i sum_x = _mm512_add_epi32(avx512::half_sum(x, 0), avx512::half_sum(x, 1));
    return _mm512_sub_epi32(avx512::isum<0, 8>(c, x), _mm512_slli_epi32(sum_x, 7));
  }
  PPINFER_AVX512 static __m512 update(const uint8_t* w, __m512 f, const Q8Tile16& x, __m512 acc) {
    return _mm512_fmadd_ps(avx512::half(w), _mm512_mul_ps(avx512::d(x), f), acc);
  }
};

template <class Block>
struct Tile16 {
  template <int kGroups>
  PPINFER_AVX512 static void tile16(const uint8_t* w, const Q8Tile16* x, int64_t stride, int k, float* acc_io,
                                    int64_t ahead) {
    __m512 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm512_loadu_ps(acc_io + g * kWideLanes);
    for (int b = 0; b < k / kBlock; ++b, w += Block::kBlockBytes) {
      avx512::prefetch_block<Block::kBlockBytes>(w, ahead);
      avx512::Codes codes;
      Block::decode(w, &codes);
      for (int g = 0; g < kGroups; ++g) {
        const Q8Tile16& xt = x[g * stride + b];
        acc[g] = Block::update(w, _mm512_cvtepi32_ps(Block::isum(codes, xt)), xt, acc[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) _mm512_storeu_ps(acc_io + g * kWideLanes, acc[g]);
  }
};

// Weight rows (avx512.h): per block, the codes of the row pairs (j, j + 4), their products with
// x by dpbusd, each row's sum, and the AVX2 weight-rows update of `Block` (its float operations,
// lane for lane: the same bits). `Pair` gives a row pair's codes as unsigned bytes.
template <int kBytes, int kQhAt>
struct PairCodes {
  static constexpr bool kSigned = false;
  PPINFER_AVX512 static __m512i codes(const uint8_t* a, const uint8_t* b) {
    const __m512i q = avx512::pair_nibble_codes(a + kBytes - kHalf, b + kBytes - kHalf);
    if constexpr (kQhAt >= 0) return _mm512_or_si512(q, avx512::pair_fifth_bits(a + kQhAt, b + kQhAt));
    return q;
  }
};

// Q8_0's signed codes go in as q + 128 (q xor 0x80); each row's sums start from -128 sum(qx).
struct Q8_0PairCodes {
  static constexpr bool kSigned = true;
  PPINFER_AVX512 static __m512i codes(const uint8_t* a, const uint8_t* b) {
    return _mm512_xor_si512(avx512::pair_bytes32(a + 2, b + 2), _mm512_set1_epi8(static_cast<char>(0x80)));
  }
};

template <class Block, class Pair>
struct WeightRows16 {
  template <int kXRows>
  PPINFER_AVX512 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                         float* acc_io, int64_t ahead) {
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int b = 0; b < k / kBlock; ++b) {
      const int64_t at = int64_t{b} * Block::kBytes;
      __m512i y[kXRows], start[kXRows], p[kXRows][kLanes / 2];
      for (int m = 0; m < kXRows; ++m) {
        y[m] = avx512::x_twice(x[m * x_stride + b].q);
        start[m] = _mm512_setzero_si512();
        if constexpr (Pair::kSigned) {  // -128 times each 4 values' sum of qx
          start[m] = _mm512_sub_epi32(start[m], _mm512_dpbusd_epi32(start[m], _mm512_set1_epi8(static_cast<char>(0x80)), y[m]));
        }
      }
      for (int j = 0; j < kLanes / 2; ++j) {
        avx2::prefetch_block<Block::kBytes>(rows[j] + at, ahead);
        avx2::prefetch_block<Block::kBytes>(rows[j + kLanes / 2] + at, ahead);
        const __m512i q = Pair::codes(rows[j] + at, rows[j + kLanes / 2] + at);
        for (int m = 0; m < kXRows; ++m) p[m][j] = _mm512_dpbusd_epi32(start[m], q, y[m]);
      }
      const RowScales scales = Block::row_scales(rows, at);
      for (int m = 0; m < kXRows; ++m) {
        const __m256 f = _mm256_cvtepi32_ps(avx512::row_sums8(p[m]));
        acc[m] = Block::update_rows(scales, f, x[m * x_stride + b], acc[m]);
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }
};

using Q4_0Pair = PairCodes<kQ4_0Bytes, -1>;
using Q4_1Pair = PairCodes<kQ4_1Bytes, -1>;
using Q5_0Pair = PairCodes<kQ5_0Bytes, 2>;
using Q5_1Pair = PairCodes<kQ5_1Bytes, 4>;
using Q4_0Block16 = Symmetric16<kQ4_0Bytes, 8, -1>;
using Q5_0Block16 = Symmetric16<kQ5_0Bytes, 16, 2>;
using Q4_1Block16 = Offset16<kQ4_1Bytes, -1>;
using Q5_1Block16 = Offset16<kQ5_1Bytes, 4>;

#endif  // PPINFER_HAS_AVX512

}  // namespace

#define PPINFER_LEGACY_AVX2(Block, Block16, Pair)                                                             \
  PPINFER_AVX2_FN(dot_weight_rows_avx2<WeightRows<Block, avx2::MaddubsDot>>),                                   \
      PPINFER_AVX2_FN(dot_tile_avx2<Tile<Block, avx2::MaddubsDot>>),                                           \
      PPINFER_AVX2_FN(dot_pair_tile_avx2<Tile<Block, avx2::MaddubsDot>>),                                      \
      PPINFER_AVX512_FN(dot_tile16_avx512<Tile16<Block16>>),                                                   \
      PPINFER_AVX512_FN(dot_weight_rows_avx512<WeightRows16<Block, Pair>>),                                    \
      PPINFER_AVXVNNI_FN(dot_weight_rows_avx2<avx2::OnAvxVnni<WeightRows<Block, avx2::VnniDot>>>),             \
      PPINFER_AVXVNNI_FN(dot_tile_avx2<avx2::OnAvxVnni<Tile<Block, avx2::VnniDot>>>),                          \
      PPINFER_AVXVNNI_FN(dot_pair_tile_avx2<avx2::OnAvxVnni<Tile<Block, avx2::VnniDot>>>)

const QTypeKernels kLegacyKernels[] = {
    {2, kBlock, kQ4_0Bytes, dot_symmetric_scalar<kQ4_0Bytes, 8, false>, dequant_symmetric<kQ4_0Bytes, 8, false>,
     PPINFER_LEGACY_AVX2(Q4_0Block, Q4_0Block16, Q4_0Pair)},
    {3, kBlock, kQ4_1Bytes, dot_offset_scalar<kQ4_1Bytes, false>, dequant_offset<kQ4_1Bytes, false>,
     PPINFER_LEGACY_AVX2(Q4_1Block, Q4_1Block16, Q4_1Pair)},
    {6, kBlock, kQ5_0Bytes, dot_symmetric_scalar<kQ5_0Bytes, 16, true>, dequant_symmetric<kQ5_0Bytes, 16, true>,
     PPINFER_LEGACY_AVX2(Q5_0Block, Q5_0Block16, Q5_0Pair)},
    {7, kBlock, kQ5_1Bytes, dot_offset_scalar<kQ5_1Bytes, true>, dequant_offset<kQ5_1Bytes, true>,
     PPINFER_LEGACY_AVX2(Q5_1Block, Q5_1Block16, Q5_1Pair)},
    {8, kBlock, kQ8_0Bytes, dot_q8_0_scalar, dequant_q8_0, PPINFER_LEGACY_AVX2(Q8_0Block, Q8_0Block16, Q8_0PairCodes)},
};
const int kLegacyKernelCount = sizeof(kLegacyKernels) / sizeof(kLegacyKernels[0]);

}  // namespace ppinfer
