// Low-bit block kernels: MXFP4 (gpt-oss experts), Q2_K and Q3_K rows against Q8Block activations.
//
// Stored layouts (ggml's block_mxfp4 / block_q2_K / block_q3_K, little-endian):
//   MXFP4 (17 bytes, 32 values):  e8m0 e | 16 bytes qs
//       w = d(e) * kv[c], kv = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12} (twice e2m1),
//       d(e) = 2^(e - 128) (e >= 2), 2^-128 (e = 1), 2^-129 (e = 0); value j's code c is the low
//       nibble of qs[j] (j < 16) or the high nibble of qs[j - 16].
//   Q2_K (84 bytes, 256 values):  16 bytes scales | 64 bytes qs | fp16 d | fp16 dmin
//       16-value sub-block j: w = d * (scales[j] & 15) * q - dmin * (scales[j] >> 4), q in 0..3.
//   Q3_K (110 bytes, 256 values): 32 bytes hmask | 64 bytes qs | 12 bytes scales | fp16 d
//       16-value sub-block j: w = d * (sc[j] - 32) * q, q = (2 low bits) - 4 * (1 - high bit),
//       sc[j] six bits: low four from byte j (j < 8) or the high nibble of byte j - 8, top two
//       bits 2 (j / 4), 2 (j / 4) + 1 of byte 8 + j % 4.
// In both K-quants value v = 128 h + 32 g + l takes its two low bits from bits 2g, 2g + 1 of
// qs[32 h + l]; Q3_K's high bit is bit v / 32 of hmask[v % 32].
//
// Every 32-value activation block b (MXFP4: the stored block; K-quants: b = v / 32) is read as
// unsigned codes u = q + o (o: MXFP4 12, Q2_K 0, Q3_K 4) with two 16-value halves, scales sc_lo,
// sc_hi (MXFP4: 1) and Q2_K's mins m_lo, m_hi. With qx the block's activation codes and hs_lo,
// hs_hi their sums over values 0..15 and 16..31, its integer dot and min sum are exact:
//   isum_b = sc_lo (sum_lo(u qx) - o hs_lo) + sc_hi (sum_hi(u qx) - o hs_hi)
//   msum_b = m_lo hs_lo + m_hi hs_hi                                       (Q2_K)
// One output's chain (qtypes.h), per stored block, with dx_b activation block b's scale:
//   inner = dx_0 * float(isum_0), then inner = fma(dx_b, float(isum_b), inner) for b = 1..
//   mins  = dx_0 * float(msum_0), then mins = fma(dx_b, float(msum_b), mins)   (Q2_K)
//   acc = fma(d, inner, acc); Q2_K: acc = fnmadd(dmin, mins, acc)
// The integer sums stay below 2^24 (Q3_K: 32 * 4 * 127 * 32), so each float(isum) is exact.
#include <cstdint>
#include <cstring>

#include "avx2.h"
#include "avx512.h"
#include "qtypes.h"

namespace ppinfer {
namespace {

constexpr int kHalfElems = kQ8Elems / 2;

// d(e) of an MXFP4 block, as ggml_e8m0_to_fp32_half.
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? uint32_t{0x00200000} << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// ---- the three kinds: layouts, scales and codes ----

struct Mxfp4 {
  static constexpr int kType = 39;  // GGMLQuantizationType.MXFP4
  static constexpr int kBlockElems = 32;
  static constexpr int kBlockBytes = 17;
  static constexpr int kActBlocks = 1;
  static constexpr int kOffset = 12;
  static constexpr bool kMins = false;
  static constexpr int8_t kValues[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

  // sc[2b + h] for half h of activation block b (m unused).
  static void scales(const uint8_t*, int* sc, int*) { sc[0] = sc[1] = 1; }
  static float d(const uint8_t* blk) { return e8m0_half(blk[0]); }
  static float dmin(const uint8_t*) { return 0.0f; }
  static void codes(const uint8_t* blk, int, uint8_t* u) {
    for (int l = 0; l < kHalfElems; ++l) {
      u[l] = static_cast<uint8_t>(kValues[blk[1 + l] & 0x0f] + kOffset);
      u[l + kHalfElems] = static_cast<uint8_t>(kValues[blk[1 + l] >> 4] + kOffset);
    }
  }
};

struct Q2K {
  static constexpr int kType = 10;
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 84;
  static constexpr int kActBlocks = 8;
  static constexpr int kOffset = 0;
  static constexpr bool kMins = true;
  static constexpr int kQsAt = 16;
  static constexpr int kDAt = 80;

  static void scales(const uint8_t* blk, int* sc, int* m) {
    for (int j = 0; j < 16; ++j) {
      sc[j] = blk[j] & 0x0f;
      m[j] = blk[j] >> 4;
    }
  }
  static float d(const uint8_t* blk) { return load_fp16(blk + kDAt); }
  static float dmin(const uint8_t* blk) { return load_fp16(blk + kDAt + 2); }
  static void codes(const uint8_t* blk, int b, uint8_t* u) {
    const uint8_t* qs = blk + kQsAt + 32 * (b / 4);
    const int shift = 2 * (b % 4);
    for (int l = 0; l < kQ8Elems; ++l) u[l] = (qs[l] >> shift) & 3;
  }
};

struct Q3K {
  static constexpr int kType = 11;
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 110;
  static constexpr int kActBlocks = 8;
  static constexpr int kOffset = 4;
  static constexpr bool kMins = false;
  static constexpr int kQsAt = 32;
  static constexpr int kScalesAt = 96;
  static constexpr int kDAt = 108;

  static void scales(const uint8_t* blk, int* sc, int*) {
    const uint8_t* s = blk + kScalesAt;
    for (int j = 0; j < 16; ++j) {
      const int low = j < 8 ? s[j] & 0x0f : s[j - 8] >> 4;
      const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
      sc[j] = (low | (high << 4)) - 32;
    }
  }
  static float d(const uint8_t* blk) { return load_fp16(blk + kDAt); }
  static float dmin(const uint8_t*) { return 0.0f; }
  static void codes(const uint8_t* blk, int b, uint8_t* u) {
    const uint8_t* qs = blk + kQsAt + 32 * (b / 4);
    const int shift = 2 * (b % 4);
    for (int l = 0; l < kQ8Elems; ++l) u[l] = static_cast<uint8_t>(((qs[l] >> shift) & 3) | (((blk[l] >> b) & 1) << 2));
  }
};

// ---- portable code ----

// The reference dot: the chain above with plain float products and sums.
template <class K>
float dot_scalar(const uint8_t* w, const Q8Block* x, int k) {
  float sum = 0.0f;
  for (int i = 0; i < k / K::kBlockElems; ++i, w += K::kBlockBytes) {
    int sc[2 * K::kActBlocks], m[2 * K::kActBlocks];
    K::scales(w, sc, m);
    float inner = 0.0f, mins = 0.0f;
    for (int b = 0; b < K::kActBlocks; ++b) {
      const Q8Block& xb = x[i * K::kActBlocks + b];
      uint8_t u[kQ8Elems];
      K::codes(w, b, u);
      int32_t isum[2] = {0, 0}, hs[2] = {0, 0};
      for (int l = 0; l < kQ8Elems; ++l) {
        isum[l / kHalfElems] += (u[l] - K::kOffset) * xb.q[l];
        hs[l / kHalfElems] += xb.q[l];
      }
      inner += xb.d * static_cast<float>(sc[2 * b] * isum[0] + sc[2 * b + 1] * isum[1]);
      if constexpr (K::kMins) mins += xb.d * static_cast<float>(m[2 * b] * hs[0] + m[2 * b + 1] * hs[1]);
    }
    sum += K::d(w) * inner;
    if constexpr (K::kMins) sum -= K::dmin(w) * mins;
  }
  return sum;
}

// Dequantization in gguf-py's float32 arithmetic: (d * sc) * q, minus (dmin * m) for Q2_K.
template <class K>
void dequant(const uint8_t* w, float* out, int k) {
  for (int i = 0; i < k / K::kBlockElems; ++i, w += K::kBlockBytes) {
    int sc[2 * K::kActBlocks], m[2 * K::kActBlocks];
    K::scales(w, sc, m);
    const float d = K::d(w);
    for (int b = 0; b < K::kActBlocks; ++b, out += kQ8Elems) {
      uint8_t u[kQ8Elems];
      K::codes(w, b, u);
      for (int l = 0; l < kQ8Elems; ++l) {
        const int j = 2 * b + l / kHalfElems;
        const float v = (d * static_cast<float>(sc[j])) * static_cast<float>(u[l] - K::kOffset);
        if constexpr (K::kMins) {
          out[l] = v - K::dmin(w) * static_cast<float>(m[j]);
        } else {
          out[l] = v;
        }
      }
    }
  }
}

// ---- AVX2 ----
#if defined(PPINFER_X86)

using avx2::load256;

PPINFER_AVX2 inline __m256 chain(bool first, __m256 a, __m256 b, __m256 sum) {
  return first ? _mm256_mul_ps(a, b) : _mm256_fmadd_ps(a, b, sum);
}

// int16 pair [a, b] in every int32 lane.
inline int32_t pair16(int a, int b) {
  return static_cast<int32_t>((static_cast<uint32_t>(a) & 0xffffu) | (static_cast<uint32_t>(b) << 16));
}

// Unsigned codes u of values 16 h .. 16 h + 15 of activation block b, from the 16 code bytes
// `load` puts in each 128-bit half (one weight row twice, or rows a and b: avx2::Layout).
template <class K>
struct Codes16;

template <>
struct Codes16<Mxfp4> {
  template <class Load>
  PPINFER_AVX2 static __m256i get(const uint8_t* blk, int, int h, Load load) {
    const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,  //
                                         12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
    const __m256i qs = load(blk + 1);
    return _mm256_shuffle_epi8(lut, _mm256_and_si256(h ? _mm256_srli_epi16(qs, 4) : qs, _mm256_set1_epi8(0x0f)));
  }
};

// Bits 2g, 2g + 1 of the K-quants' qs bytes for block b = 4 (qs half) + g.
template <class K, class Load>
PPINFER_AVX2 inline __m256i low_two_bits(const uint8_t* blk, int b, int h, Load load) {
  const __m256i qs = load(blk + K::kQsAt + 32 * (b / 4) + kHalfElems * h);
  return _mm256_and_si256(_mm256_srli_epi16(qs, 2 * (b % 4)), _mm256_set1_epi8(3));
}

template <>
struct Codes16<Q2K> {
  template <class Load>
  PPINFER_AVX2 static __m256i get(const uint8_t* blk, int b, int h, Load load) {
    return low_two_bits<Q2K>(blk, b, h, load);
  }
};

template <>
struct Codes16<Q3K> {
  template <class Load>
  PPINFER_AVX2 static __m256i get(const uint8_t* blk, int b, int h, Load load) {
    const __m256i hm = load(blk + kHalfElems * h);  // bit b: the high bit of block b's values
    const __m256i high = b <= 2 ? _mm256_slli_epi16(hm, 2 - b) : _mm256_srli_epi16(hm, b - 2);
    return _mm256_or_si256(low_two_bits<Q3K>(blk, b, h, load), _mm256_and_si256(high, _mm256_set1_epi8(4)));
  }
};

// Loads 16 bytes into the low half (the high half unused).
struct LoadLow {
  PPINFER_AVX2 __m256i operator()(const uint8_t* p) const {
    return _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// Block b's 32 unsigned codes in value order.
template <class K>
PPINFER_AVX2 inline __m256i codes32(const uint8_t* blk, int b) {
  const __m256i lo = Codes16<K>::get(blk, b, 0, LoadLow{});
  const __m256i hi = Codes16<K>::get(blk, b, 1, LoadLow{});
  return _mm256_permute2x128_si256(lo, hi, 0x20);
}

// Loads 32 bytes in order.
struct Load32 {
  PPINFER_AVX2 __m256i operator()(const uint8_t* p) const { return load256(p); }
};

// A K-quant block's 16 sub-block scales (and Q2_K's mins) as signed bytes, in vector form.
template <class K>
struct ScaleBytes;

template <>
struct ScaleBytes<Q2K> {
  PPINFER_AVX2 static __m128i scales(const uint8_t* blk) {
    return _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)), _mm_set1_epi8(0x0f));
  }
  PPINFER_AVX2 static __m128i mins(const uint8_t* blk) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    return _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
  }
};

template <>
struct ScaleBytes<Q3K> {
  // Low four bits: the low nibbles of bytes 0..7 (j < 8), then their high nibbles; top two bits
  // of scale j = 4t + i: bits 2t, 2t + 1 of byte 8 + i (one dword shifted by 0, 2, 4, 6).
  PPINFER_AVX2 static __m128i scales(const uint8_t* blk) {
    const __m128i low8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + Q3K::kScalesAt));
    const __m128i nibbles = _mm_and_si128(_mm_unpacklo_epi64(low8, _mm_srli_epi16(low8, 4)), _mm_set1_epi8(0x0f));
    int32_t top_bytes;
    std::memcpy(&top_bytes, blk + Q3K::kScalesAt + 8, sizeof top_bytes);
    const __m128i top = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(top_bytes), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(nibbles, _mm_slli_epi16(top, 4)), _mm_set1_epi8(32));
  }
  PPINFER_AVX2 static __m128i mins(const uint8_t*) { return _mm_setzero_si128(); }
};

template <class K>
struct Kernel : avx2::TileEntries<Kernel<K>> {
  // 8 weight rows (lanes) against kXRows x rows: the K-quants' or MXFP4's weight_rows below.
  template <int kXRows>
  PPINFER_AVX2 static void weight_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                       float* acc_io, int64_t ahead) {
    if constexpr (K::kActBlocks == 1) {
      mxfp4_rows<kXRows>(rows, x, x_stride, k, acc_io, ahead);
    } else {
      kquant_rows<kXRows>(rows, x, x_stride, k, acc_io, ahead);
    }
  }

  // MXFP4: per row and block the signed values kv (a byte shuffle of the nibbles) against qx,
  // |kv| against qx with kv's sign (int16 pairs at most 2 * 12 * 127), the rows' sums in lanes.
  template <int kXRows>
  PPINFER_AVX2 static void mxfp4_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                      float* acc_io, int64_t ahead) {
    const __m256i values = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,  //
                                            0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int b = 0; b < k / K::kBlockElems; ++b) {
      const int64_t at = int64_t{b} * K::kBlockBytes;
      __m256i y[kXRows], p[kXRows][kLanes];
      for (int m = 0; m < kXRows; ++m) y[m] = load256(x[m * x_stride + b].q);
      for (int r = 0; r < kLanes; ++r) {
        avx2::prefetch_block<K::kBlockBytes>(rows[r] + at, ahead);
        const __m256i qs = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + at + 1)));
        const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi64(qs, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0f));
        const __m256i kv = _mm256_shuffle_epi8(values, nibbles);
        const __m256i magnitude = _mm256_abs_epi8(kv);
        for (int m = 0; m < kXRows; ++m) p[m][r] = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(y[m], kv));
      }
      // d(e) in each row's lane: 2^(e - 128) as the float bits (e - 1) << 23, 2^-128 and 2^-129 below.
      const __m256i ev = _mm256_setr_epi32(rows[0][at], rows[1][at], rows[2][at], rows[3][at], rows[4][at],
                                           rows[5][at], rows[6][at], rows[7][at]);
      const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(ev, _mm256_set1_epi32(1)), 23);
      const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), ev);
      const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), ev);
      const __m256 d = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, small));
      for (int m = 0; m < kXRows; ++m) {
        const __m256 f = _mm256_cvtepi32_ps(avx2::lane_sums8_16(p[m]));
        acc[m] = _mm256_fmadd_ps(d, _mm256_mul_ps(_mm256_set1_ps(x[m * x_stride + b].d), f), acc[m]);
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }

  // [sums of values 0..15 of blocks 0..3 | values 16..31 of blocks 0..3] of 4 blocks' int16 lanes
  // (each lane pair adds up within int16), in int32.
  PPINFER_AVX2 static __m256i half_sums4(const __m256i* p) {
    return avx2::quad_sums(avx2::pair_sums16(p[0], p[1]), avx2::pair_sums16(p[2], p[3]));
  }

  // Q2_K / Q3_K: per row and half super-block (4 blocks), the blocks' sums of u qx per 16 values
  // less o times x's (shared by the rows), times their scales (int32), the halves of each block
  // added: isum exactly, as the tiles'; likewise Q2_K's min sums. The rows' sums (lanes: blocks)
  // are then transposed to lanes = rows for the chain.
  template <int kXRows>
  PPINFER_AVX2 static void kquant_rows(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int k,
                                       float* acc_io, int64_t ahead) {
    __m256 acc[kXRows];
    for (int m = 0; m < kXRows; ++m) acc[m] = _mm256_loadu_ps(acc_io + m * kLanes);
    for (int i = 0; i < k / K::kBlockElems; ++i) {
      const int64_t at = int64_t{i} * K::kBlockBytes;
      __m256i y[kXRows][K::kActBlocks], hs[kXRows][2];  // hs: x's half sums per half super-block
      for (int m = 0; m < kXRows; ++m) {
        const Q8Block* xs = x + m * x_stride + i * K::kActBlocks;
        for (int h = 0; h < 2; ++h) {
          __m256i p[4];
          for (int t = 0; t < 4; ++t) {
            y[m][4 * h + t] = load256(xs[4 * h + t].q);
            p[t] = _mm256_maddubs_epi16(_mm256_set1_epi8(1), y[m][4 * h + t]);
          }
          hs[m][h] = half_sums4(p);
        }
      }
      __m256 f[kXRows][kLanes], fm[kXRows][kLanes];  // [x row][weight row], lanes: blocks 0..7
      for (int r = 0; r < kLanes; ++r) {
        const uint8_t* blk = rows[r] + at;
        avx2::prefetch_block<K::kBlockBytes>(blk, ahead);
        const __m128i scale_bytes = ScaleBytes<K>::scales(blk), min_bytes = ScaleBytes<K>::mins(blk);
        __m256i part[kXRows][2], mpart[kXRows][2];
        for (int h = 0; h < 2; ++h) {
          __m256i u[4];
          for (int t = 0; t < 4; ++t) u[t] = Codes16<K>::get(blk, 4 * h + t, 0, Load32{});
          // half h's scales [sc(8h + 2t) for t < 4 | sc(8h + 2t + 1) for t < 4], as int32
          const __m128i pick = _mm_add_epi8(_mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 0, 0, 0, 0, 0, 0, 0, 0),
                                            _mm_set1_epi8(static_cast<char>(8 * h)));
          const __m256i scales = _mm256_cvtepi8_epi32(_mm_shuffle_epi8(scale_bytes, pick));
          const __m256i mins = _mm256_cvtepi8_epi32(_mm_shuffle_epi8(min_bytes, pick));
          for (int m = 0; m < kXRows; ++m) {
            __m256i p[4];
            for (int t = 0; t < 4; ++t) p[t] = _mm256_maddubs_epi16(u[t], y[m][4 * h + t]);
            __m256i s = half_sums4(p);
            if constexpr (K::kOffset != 0) s = _mm256_sub_epi32(s, _mm256_mullo_epi32(_mm256_set1_epi32(K::kOffset), hs[m][h]));
            s = _mm256_mullo_epi32(s, scales);
            part[m][h] = _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 0x01));  // blocks 0..3, twice
            if constexpr (K::kMins) {
              const __m256i ms = _mm256_mullo_epi32(mins, hs[m][h]);
              mpart[m][h] = _mm256_add_epi32(ms, _mm256_permute2x128_si256(ms, ms, 0x01));
            }
          }
        }
        for (int m = 0; m < kXRows; ++m) {
          f[m][r] = _mm256_cvtepi32_ps(_mm256_blend_epi32(part[m][0], part[m][1], 0xF0));
          if constexpr (K::kMins) fm[m][r] = _mm256_cvtepi32_ps(_mm256_blend_epi32(mpart[m][0], mpart[m][1], 0xF0));
        }
      }
      const __m256 d = avx2::halves8(rows, at + K::kDAt);
      for (int m = 0; m < kXRows; ++m) {
        const Q8Block* xs = x + m * x_stride + i * K::kActBlocks;
        avx2::transpose8(f[m]);  // f[m][b], lanes rows
        __m256 inner = _mm256_setzero_ps();
        for (int b = 0; b < K::kActBlocks; ++b) inner = chain(b == 0, _mm256_set1_ps(xs[b].d), f[m][b], inner);
        acc[m] = _mm256_fmadd_ps(d, inner, acc[m]);
        if constexpr (K::kMins) {
          avx2::transpose8(fm[m]);
          __m256 mins = _mm256_setzero_ps();
          for (int b = 0; b < K::kActBlocks; ++b) mins = chain(b == 0, _mm256_set1_ps(xs[b].d), fm[m][b], mins);
          acc[m] = _mm256_fnmadd_ps(avx2::halves8(rows, at + K::kDAt + 2), mins, acc[m]);
        }
      }
    }
    for (int m = 0; m < kXRows; ++m) _mm256_storeu_ps(acc_io + m * kLanes, acc[m]);
  }

  // Tiles (qtypes.h): one weight row against kGroups groups of 8 x rows, or two against 4.
  // Codes (<= 24) times x, 4 dwords a half in int16, scaled per half by madd; the offsets and
  // mins by madd of x's int16 half sums with [o sc_lo, o sc_hi] / [m_lo, m_hi].
  template <int kGroups, class XTile>
  PPINFER_AVX2 static void run(const avx2::Layout<XTile>& layout, const uint8_t* w, const XTile* x, int64_t stride,
                               int k, float* acc_io, int64_t ahead) {
    using L = avx2::Layout<XTile>;
    constexpr int kRows = L::kWeightRows;
    const avx2::Bytes16<XTile> bytes16{layout};
    __m256 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm256_loadu_ps(acc_io + g * kLanes);
    for (int i = 0; i < k / K::kBlockElems; ++i, w += K::kBlockBytes) {
      const XTile* xs = x + i * K::kActBlocks;
      int sc[kRows][2 * K::kActBlocks], mn[kRows][2 * K::kActBlocks];
      __m256 d_rows[kRows], dmin_rows[kRows];
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* wr = w + r * layout.delta;
        avx2::prefetch_block<K::kBlockBytes>(wr, ahead);
        K::scales(wr, sc[r], mn[r]);
        d_rows[r] = _mm256_set1_ps(K::d(wr));
        dmin_rows[r] = _mm256_set1_ps(K::dmin(wr));
      }
      __m256 inner[kGroups], mins[kGroups];
      for (int b = 0; b < K::kActBlocks; ++b) {
        const __m256i lo = Codes16<K>::get(w, b, 0, bytes16);
        const __m256i hi = Codes16<K>::get(w, b, 1, bytes16);
        __m256i s_lo[kRows], s_hi[kRows], side[kRows];
        for (int r = 0; r < kRows; ++r) {
          s_lo[r] = _mm256_set1_epi16(static_cast<int16_t>(sc[r][2 * b]));
          s_hi[r] = _mm256_set1_epi16(static_cast<int16_t>(sc[r][2 * b + 1]));
          side[r] = _mm256_set1_epi32(K::kMins ? pair16(mn[r][2 * b], mn[r][2 * b + 1])
                                               : pair16(K::kOffset * sc[r][2 * b], K::kOffset * sc[r][2 * b + 1]));
        }
        const __m256i scale_lo = L::mix(s_lo), scale_hi = L::mix(s_hi), side_scale = L::mix(side);
        for (int g = 0; g < kGroups; ++g) {
          const XTile& xt = xs[g * stride + b];
          __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(avx2::tile_products<0, 4>(lo, hi, xt), scale_lo),
                                          _mm256_madd_epi16(avx2::tile_products<4, 8>(lo, hi, xt), scale_hi));
          const __m256i side_sum = _mm256_madd_epi16(L::half_sums(xt), side_scale);
          if constexpr (!K::kMins && K::kOffset != 0) isum = _mm256_sub_epi32(isum, side_sum);
          inner[g] = chain(b == 0, L::d(xt), _mm256_cvtepi32_ps(isum), inner[g]);
          if constexpr (K::kMins) mins[g] = chain(b == 0, L::d(xt), _mm256_cvtepi32_ps(side_sum), mins[g]);
        }
      }
      const __m256 d = L::mix(d_rows), dmin = L::mix(dmin_rows);
      for (int g = 0; g < kGroups; ++g) {
        acc[g] = _mm256_fmadd_ps(d, inner[g], acc[g]);
        if constexpr (K::kMins) acc[g] = _mm256_fnmadd_ps(dmin, mins[g], acc[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) _mm256_storeu_ps(acc_io + g * kLanes, acc[g]);
  }
};

#endif  // PPINFER_X86

// ---- AVX-512 (VNNI) ----
#if defined(PPINFER_HAS_AVX512)

// The chain above in 16 lanes (x rows), each half's integer dot by dpbusd.
template <class K>
struct Kernel16 {
  template <int kGroups>
  PPINFER_AVX512 static void tile16(const uint8_t* w, const Q8Tile16* x, int64_t stride, int k, float* acc_io,
                                    int64_t ahead) {
    __m512 acc[kGroups];
    for (int g = 0; g < kGroups; ++g) acc[g] = _mm512_loadu_ps(acc_io + g * kWideLanes);
    for (int i = 0; i < k / K::kBlockElems; ++i, w += K::kBlockBytes) {
      avx512::prefetch_block<K::kBlockBytes>(w, ahead);
      const Q8Tile16* xs = x + i * K::kActBlocks;
      int sc[2 * K::kActBlocks], mn[2 * K::kActBlocks];
      K::scales(w, sc, mn);
      __m512 inner[kGroups], mins[kGroups];
      for (int b = 0; b < K::kActBlocks; ++b) {
        avx512::Codes codes;
        avx512::store(codes32<K>(w, b), &codes);
        const __m512i sc_lo = _mm512_set1_epi32(sc[2 * b]), sc_hi = _mm512_set1_epi32(sc[2 * b + 1]);
        const __m512i m_lo = _mm512_set1_epi32(mn[2 * b]), m_hi = _mm512_set1_epi32(mn[2 * b + 1]);
        const __m512i offset = _mm512_set1_epi32(K::kOffset);
        for (int g = 0; g < kGroups; ++g) {
          const Q8Tile16& xt = xs[g * stride + b];
          const __m512i hs_lo = avx512::half_sum(xt, 0), hs_hi = avx512::half_sum(xt, 1);
          const __m512i lo = _mm512_sub_epi32(avx512::isum<0, 4>(codes, xt), _mm512_mullo_epi32(offset, hs_lo));
          const __m512i hi = _mm512_sub_epi32(avx512::isum<4, 8>(codes, xt), _mm512_mullo_epi32(offset, hs_hi));
          const __m512i isum = _mm512_add_epi32(_mm512_mullo_epi32(lo, sc_lo), _mm512_mullo_epi32(hi, sc_hi));
          const __m512 f = _mm512_cvtepi32_ps(isum);
          inner[g] = b == 0 ? _mm512_mul_ps(avx512::d(xt), f) : _mm512_fmadd_ps(avx512::d(xt), f, inner[g]);
          if constexpr (K::kMins) {
            const __m512i msum = _mm512_add_epi32(_mm512_mullo_epi32(m_lo, hs_lo), _mm512_mullo_epi32(m_hi, hs_hi));
            const __m512 fm = _mm512_cvtepi32_ps(msum);
            mins[g] = b == 0 ? _mm512_mul_ps(avx512::d(xt), fm) : _mm512_fmadd_ps(avx512::d(xt), fm, mins[g]);
          }
        }
      }
      const __m512 d = _mm512_set1_ps(K::d(w));
      for (int g = 0; g < kGroups; ++g) {
        acc[g] = _mm512_fmadd_ps(d, inner[g], acc[g]);
        if constexpr (K::kMins) acc[g] = _mm512_fnmadd_ps(_mm512_set1_ps(K::dmin(w)), mins[g], acc[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) _mm512_storeu_ps(acc_io + g * kWideLanes, acc[g]);
  }
};

#endif  // PPINFER_HAS_AVX512

}  // namespace

#define PPINFER_LOWBIT_ENTRY(K)                                                                           \
  {K::kType, K::kBlockElems, K::kBlockBytes, dot_scalar<K>, dequant<K>,                                     \
   PPINFER_AVX2_FN(dot_weight_rows_avx2<Kernel<K>>), PPINFER_AVX2_FN(dot_tile_avx2<Kernel<K>>),            \
   PPINFER_AVX2_FN(dot_pair_tile_avx2<Kernel<K>>), PPINFER_AVX512_FN(dot_tile16_avx512<Kernel16<K>>)}

const QTypeKernels kLowBitKernels[] = {
    PPINFER_LOWBIT_ENTRY(Q2K),
    PPINFER_LOWBIT_ENTRY(Q3K),
    PPINFER_LOWBIT_ENTRY(Mxfp4),
};
const int kLowBitKernelCount = sizeof(kLowBitKernels) / sizeof(kLowBitKernels[0]);

}  // namespace ppinfer
