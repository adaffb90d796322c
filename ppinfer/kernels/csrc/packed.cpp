// Weight rows packed 16 at a time (namespace ppinfer_kernels ops pack_rows, unpack_rows,
// packed_matmul, packed_experts_matmul): the layout the decode products stream, for Q4_0, Q4_1,
// Q8_0 and Q4_K (AVX2, AVX-VNNI and AVX-512 VNNI kernels).
//
// Row-major blocks (qtypes.h) leave a kernel that puts one weight row in each vector lane to
// gather every row's scales and to add up every row's partial sums across the lanes of a
// vector, per block: more instructions than bytes when one x row meets the weights. Packed,
// the 16 rows of a group keep block b of all 16 rows together, and in each field lane i is row
// i's:
//   [fp16 field f of rows 0..15]              for each of the type's fp16 fields (d; d, m; d, dmin)
//   [dword c of rows 0..15's codes]           for c = 0 .. code_bytes / 4 - 1
// so one 512-bit load is one dword of codes for 16 rows, dpbusd against the x dword broadcast
// adds each row's four products in its own lane, and the scales come in one load. A group of
// nb blocks is 16 * nb * block_bytes contiguous bytes: a thread streams one run. Rows past n in
// the last group are zero (their scales too), and their outputs are never written.
//
// The float chain of every output is the one of qtypes.h, with each type's update written as
// the row-major AVX2 kernels write it: a packed product gives the same bits as block_matmul on
// the row-major weights, for every number of x rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "activations.h"
#include "avx2.h"
#include "isa.h"
#include "pages.h"
#include "ops.h"
#include "qtypes.h"

namespace ppinfer {
namespace {

constexpr int kGroupRows = 16;  // weight rows per packed group (one 512-bit lane each)
constexpr int kDwordBytes = 4;
// x rows per kernel call: their chains stay in registers next to the decoded block.
constexpr int kMaxXRows = 4;
// x blocks per k-chunk when several x rows meet a group (the group's chunk stays in L1 while
// every x row passes); one x row takes the whole row as one chunk.
constexpr int64_t kChunkBlocks = 16;
constexpr int64_t kGrainMacs = int64_t{1} << 15;

// acc[m * kGroupRows + i] (in / out): the chains of the group's weight row i against x row m
// (m < x_rows <= kMaxXRows, x row m's 32-value blocks at x + m * x_stride) over `blocks` weight
// blocks, w at the group's first packed block of them. Each packed block read also prefetches
// the one `ahead` bytes past it.
using DotPackedFn = void (*)(const uint8_t* w, const Q8Block* x, int64_t x_stride, int x_rows, int blocks,
                             float* acc, int64_t ahead);

struct PackedKernels {
  int ggml_type;
  int block_elems;  // values per block: 32, or 256 (K-quants: 8 x blocks per weight block)
  int fields;       // fp16 fields at the start of a block
  int block_bytes;  // bytes of one row's block
  DotPackedFn avx2;
  DotPackedFn avxvnni;  // the AVX2 kernel over AVX-VNNI's dots
  DotPackedFn avx512;
};

// ---- the layout ----

int64_t packed_block_bytes(const PackedKernels& t) { return int64_t{kGroupRows} * t.block_bytes; }

// Group g's 16 rows (rows past n: zero) of `rows` (row-major, row_bytes each) into `out`.
void pack_group(const PackedKernels& t, const uint8_t* rows, int64_t row_bytes, int64_t n, int64_t g, int64_t nb,
                uint8_t* out) {
  const int header = 2 * t.fields;
  const int dwords = (t.block_bytes - header) / kDwordBytes;
  for (int64_t b = 0; b < nb; ++b, out += packed_block_bytes(t)) {
    std::memset(out, 0, static_cast<size_t>(packed_block_bytes(t)));
    for (int i = 0; i < kGroupRows && g * kGroupRows + i < n; ++i) {
      const uint8_t* block = rows + (g * kGroupRows + i) * row_bytes + b * t.block_bytes;
      for (int f = 0; f < t.fields; ++f) std::memcpy(out + f * 2 * kGroupRows + 2 * i, block + 2 * f, 2);
      for (int c = 0; c < dwords; ++c) {
        std::memcpy(out + header * kGroupRows + c * kDwordBytes * kGroupRows + kDwordBytes * i,
                    block + header + kDwordBytes * c, kDwordBytes);
      }
    }
  }
}

// The inverse of pack_group for the group's rows below n.
void unpack_group(const PackedKernels& t, const uint8_t* in, int64_t row_bytes, int64_t n, int64_t g, int64_t nb,
                  uint8_t* rows) {
  const int header = 2 * t.fields;
  const int dwords = (t.block_bytes - header) / kDwordBytes;
  for (int64_t b = 0; b < nb; ++b, in += packed_block_bytes(t)) {
    for (int i = 0; i < kGroupRows && g * kGroupRows + i < n; ++i) {
      uint8_t* block = rows + (g * kGroupRows + i) * row_bytes + b * t.block_bytes;
      for (int f = 0; f < t.fields; ++f) std::memcpy(block + 2 * f, in + f * 2 * kGroupRows + 2 * i, 2);
      for (int c = 0; c < dwords; ++c) {
        std::memcpy(block + header + kDwordBytes * c,
                    in + header * kGroupRows + c * kDwordBytes * kGroupRows + kDwordBytes * i, kDwordBytes);
      }
    }
  }
}

#if defined(PPINFER_X86)

// x dword c: values 4c .. 4c+3 of an x block as one int32, for the kernels to broadcast.
inline int32_t x_dword(const Q8Block& x, int c) {
  int32_t v;
  std::memcpy(&v, x.q + kDwordBytes * c, sizeof v);
  return v;
}

template <int kBlockBytes>
inline void prefetch_packed(const uint8_t* p, int64_t ahead) {
  if (ahead == 0) return;
  for (int i = 0; i < kGroupRows * kBlockBytes; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + ahead + i), _MM_HINT_T0);
  }
}

// ---- AVX2: the group as two halves of 8 rows (lanes), each its own 256 bits of every field ----

// The packed block's float field f of rows 8h .. 8h + 7.
PPINFER_AVX2 inline __m256 field8(const uint8_t* p, int f, int h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + f * 2 * kGroupRows + 16 * h)));
}

// Each kernel takes its integer dots from Dot (avx2.h: MaddubsDot, or VnniDot for AVX-VNNI).

// Q4_0 / Q4_1: 16 code bytes, dword c's low nibbles values 4c .. 4c+3, its high ones 16 + 4c ...
// maddubs products are at most 2 * 15 * 127, so the 8 of a block add up within int16.
template <int kFields, class Dot>
struct Nibbles8 {
  static constexpr int kHeader = 2 * kFields;
  // Each dword of codes is decoded once and met by every x row before the next (the x rows'
  // sums stay in registers: AVX2 has 16).
  template <int kX>
  PPINFER_AVX2 static void half(const uint8_t* p, int h, const Q8Block* x, int64_t x_stride, __m256* acc) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i sum[kX];
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) sum[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 4; ++c) {
      const __m256i v = avx2::load256(p + kHeader * kGroupRows + c * kDwordBytes * kGroupRows + 32 * h);
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 8
      for (int m = 0; m < kX; ++m) {
        const Q8Block& xb = x[m * x_stride];
        sum[m] = Dot::add(sum[m], lo, _mm256_set1_epi32(x_dword(xb, c)));
        sum[m] = Dot::add(sum[m], hi, _mm256_set1_epi32(x_dword(xb, 4 + c)));
      }
    }
    const __m256 d = field8(p, 0, h);
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) {
      const Q8Block& xb = x[m * x_stride];
      const __m256 f = _mm256_cvtepi32_ps(Dot::widen(sum[m]));
      if constexpr (kFields == 1) {  // Q4_0: acc = fma(d, fma(dx, f, -(8 s)), acc)
        const __m256 t = _mm256_fmsub_ps(_mm256_set1_ps(xb.d), f, _mm256_set1_ps(xb.s * 8));
        acc[m] = _mm256_fmadd_ps(d, t, acc[m]);
      } else {  // Q4_1: acc = fma(m, s, fma(d * dx, f, acc))
        const __m256 ddx = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
        acc[m] = _mm256_fmadd_ps(field8(p, 1, h), _mm256_set1_ps(xb.s), _mm256_fmadd_ps(ddx, f, acc[m]));
      }
    }
  }
};

// Q8_0: 32 signed codes; |q| against x with q's sign (pairs up to 2 * 128 * 127, so each
// dword's products go to int32 on their own). Dword by dword, as above.
template <class Dot>
struct Signed8 {
  template <int kX>
  PPINFER_AVX2 static void half(const uint8_t* p, int h, const Q8Block* x, int64_t x_stride, __m256* acc) {
    __m256i sum[kX];
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) sum[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i q = avx2::load256(p + 2 * kGroupRows + c * kDwordBytes * kGroupRows + 32 * h);
      const __m256i abs_q = _mm256_abs_epi8(q);
#pragma GCC unroll 8
      for (int m = 0; m < kX; ++m) {
        const __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(x_dword(x[m * x_stride], c)), q);
        sum[m] = Dot::add32(sum[m], abs_q, signed_x);
      }
    }
    const __m256 d = field8(p, 0, h);
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) {
      const __m256 f = _mm256_cvtepi32_ps(sum[m]);
      acc[m] = _mm256_fmadd_ps(d, _mm256_mul_ps(_mm256_set1_ps(x[m * x_stride].d), f), acc[m]);  // fma(d, dx * f, acc)
    }
  }
};

// One x row streams both halves of each block (a decode step reads the weights once, in order);
// several x rows take one half at a time over the chunk, so their chains and the half's codes
// fit AVX2's 16 registers (the chunk is in L1 for the second pass).
// Q4_K (see Q4K16 below for the layout and the chain) on 8 rows: 6-bit scales and mins
// unpacked in lanes; maddubs products are at most 2 * 15 * 127, so a sub-block's 8 dwords add
// up within int16.
template <class Dot>
struct Q4K8 {
  static constexpr int kHeader = 4;
  PPINFER_AVX2 static __m256i dwords8(const uint8_t* p, int c, int h) {
    return avx2::load256(p + kHeader * kGroupRows + c * kDwordBytes * kGroupRows + 32 * h);
  }
  // Byte j % 4 of each lane of `packed` (the scales, or mins, of sub-blocks 0-3 or 4-7 of the
  // lane's row) as a float: sub-block j's.
  PPINFER_AVX2 static __m256 byte_float(__m256i packed, int j) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(packed, 8 * (j % 4)), _mm256_set1_epi32(0xff)));
  }
  template <int kX>
  PPINFER_AVX2 static void half(const uint8_t* p, int h, const Q8Block* x, int64_t x_stride, __m256* acc) {
    const __m256i lo = dwords8(p, 0, h), mid = dwords8(p, 1, h), hi = dwords8(p, 2, h);
    const __m256i six = _mm256_set1_epi32(0x3f3f3f3f), four = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i two = _mm256_set1_epi32(0x03030303);
    const __m256i sc03 = _mm256_and_si256(lo, six), m03 = _mm256_and_si256(mid, six);
    const __m256i sc47 = _mm256_or_si256(_mm256_and_si256(hi, four),
                                         _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(lo, 6), two), 4));
    const __m256i m47 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(hi, 4), four),
                                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(mid, 6), two), 4));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 inner[kX], mins[kX];
    for (int pair = 0; pair < 4; ++pair) {
      __m256i sum[kX][2];
#pragma GCC unroll 8
      for (int m = 0; m < kX; ++m) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m256i v = dwords8(p, 3 + 8 * pair + t, h);
        const __m256i even = _mm256_and_si256(v, low4);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 8
        for (int m = 0; m < kX; ++m) {
          const Q8Block* xm = x + m * x_stride;
          sum[m][0] = Dot::add(sum[m][0], even, _mm256_set1_epi32(x_dword(xm[2 * pair], t)));
          sum[m][1] = Dot::add(sum[m][1], odd, _mm256_set1_epi32(x_dword(xm[2 * pair + 1], t)));
        }
      }
      for (int e = 0; e < 2; ++e) {
        const int j = 2 * pair + e;
        const __m256 sc = byte_float(j < 4 ? sc03 : sc47, j), mn = byte_float(j < 4 ? m03 : m47, j);
#pragma GCC unroll 8
        for (int m = 0; m < kX; ++m) {
          const Q8Block& xb = x[m * x_stride + j];
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(Dot::widen(sum[m][e])), sc);
          const __m256 dx = _mm256_set1_ps(xb.d), sx = _mm256_set1_ps(xb.s);
          inner[m] = j == 0 ? _mm256_mul_ps(dx, f) : _mm256_fmadd_ps(dx, f, inner[m]);
          mins[m] = j == 0 ? _mm256_mul_ps(mn, sx) : _mm256_fmadd_ps(mn, sx, mins[m]);
        }
      }
    }
    const __m256 d = field8(p, 0, h), dmin = field8(p, 1, h);
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) {
      acc[m] = _mm256_fmadd_ps(d, inner[m], acc[m]);
      acc[m] = _mm256_fnmadd_ps(dmin, mins[m], acc[m]);
    }
  }
};

// kXBlocks: 32-value x blocks per weight block.
template <class Block, int kBlockBytes, int kXBlocks = 1>
struct Packed8 {
  template <int kX, int kH0, int kH1>
  PPINFER_AVX2 static void halves(const uint8_t* w, const Q8Block* x, int64_t x_stride, int blocks,
                                  float* acc_io, int64_t ahead) {
    __m256 acc[2][kX];
    for (int h = kH0; h < kH1; ++h) {
#pragma GCC unroll 8
      for (int m = 0; m < kX; ++m) acc[h][m] = _mm256_loadu_ps(acc_io + m * kGroupRows + 8 * h);
    }
    for (int b = 0; b < blocks; ++b, w += kGroupRows * kBlockBytes) {
      prefetch_packed<kBlockBytes>(w, ahead);
      for (int h = kH0; h < kH1; ++h) Block::template half<kX>(w, h, x + b * kXBlocks, x_stride, acc[h]);
    }
    for (int h = kH0; h < kH1; ++h) {
#pragma GCC unroll 8
      for (int m = 0; m < kX; ++m) _mm256_storeu_ps(acc_io + m * kGroupRows + 8 * h, acc[h][m]);
    }
  }
  template <int kX>
  PPINFER_AVX2 static void run(const uint8_t* w, const Q8Block* x, int64_t x_stride, int blocks, float* acc_io,
                               int64_t ahead) {
    if constexpr (kX == 1) {
      halves<kX, 0, 2>(w, x, x_stride, blocks, acc_io, ahead);
    } else {
      halves<kX, 0, 1>(w, x, x_stride, blocks, acc_io, ahead);
      halves<kX, 1, 2>(w, x, x_stride, blocks, acc_io, 0);
    }
  }
};

#endif  // PPINFER_X86

#if defined(PPINFER_HAS_AVX512)

// ---- AVX-512 VNNI: the whole group in one vector, lane i row i ----

PPINFER_AVX512 inline __m512 field16(const uint8_t* p, int f) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + f * 2 * kGroupRows)));
}

PPINFER_AVX512 inline __m512i codes16(const uint8_t* p, int header, int c) {
  return _mm512_loadu_si512(p + header * kGroupRows + c * kDwordBytes * kGroupRows);
}

// Q4_0 / Q4_1: low nibbles of dword c against x dword c, high ones against x dword 4 + c (two
// sums, so the dpbusd chains overlap).
template <int kFields>
struct Nibbles16 {
  template <int kX>
  PPINFER_AVX512 static void block(const uint8_t* p, const Q8Block* x, int64_t x_stride, __m512* acc) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i lo[4], hi[4];
#pragma GCC unroll 8
    for (int c = 0; c < 4; ++c) {
      const __m512i v = codes16(p, 2 * kFields, c);
      lo[c] = _mm512_and_si512(v, low4);
      hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 d = field16(p, 0);
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) {
      const Q8Block& xb = x[m * x_stride];
      __m512i sum_lo = _mm512_setzero_si512(), sum_hi = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int c = 0; c < 4; ++c) {
        sum_lo = _mm512_dpbusd_epi32(sum_lo, lo[c], _mm512_set1_epi32(x_dword(xb, c)));
        sum_hi = _mm512_dpbusd_epi32(sum_hi, hi[c], _mm512_set1_epi32(x_dword(xb, 4 + c)));
      }
      const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(sum_lo, sum_hi));
      if constexpr (kFields == 1) {  // Q4_0: acc = fma(d, fma(dx, f, -(8 s)), acc)
        const __m512 t = _mm512_fmsub_ps(_mm512_set1_ps(xb.d), f, _mm512_set1_ps(xb.s * 8));
        acc[m] = _mm512_fmadd_ps(d, t, acc[m]);
      } else {  // Q4_1: acc = fma(m, s, fma(d * dx, f, acc))
        const __m512 ddx = _mm512_mul_ps(d, _mm512_set1_ps(xb.d));
        acc[m] = _mm512_fmadd_ps(field16(p, 1), _mm512_set1_ps(xb.s), _mm512_fmadd_ps(ddx, f, acc[m]));
      }
    }
  }
};

// Q8_0: dpbusd takes unsigned weight bytes, so the codes go in as q + 128 (q xor 0x80) and
// 128 sum(qx) comes off each row's integer sum again.
struct Signed16 {
  template <int kX>
  PPINFER_AVX512 static void block(const uint8_t* p, const Q8Block* x, int64_t x_stride, __m512* acc) {
    __m512i q[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) q[c] = _mm512_xor_si512(codes16(p, 2, c), _mm512_set1_epi8(static_cast<char>(0x80)));
    const __m512 d = field16(p, 0);
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) {
      const Q8Block& xb = x[m * x_stride];
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q));
      // sum(qx) from sum(qx + 128) by sad against zero, four 64-bit partial sums.
      const __m256i biased = _mm256_sad_epu8(_mm256_xor_si256(xq, _mm256_set1_epi8(static_cast<char>(0x80))),
                                             _mm256_setzero_si256());
      const __m128i halves = _mm_add_epi64(_mm256_castsi256_si128(biased), _mm256_extracti128_si256(biased, 1));
      const int32_t sum_x = static_cast<int32_t>(_mm_cvtsi128_si64(halves) + _mm_extract_epi64(halves, 1)) - 128 * kQ8Elems;
      __m512i even = _mm512_set1_epi32(-128 * sum_x), odd = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int c = 0; c < 8; c += 2) {
        even = _mm512_dpbusd_epi32(even, q[c], _mm512_set1_epi32(x_dword(xb, c)));
        odd = _mm512_dpbusd_epi32(odd, q[c + 1], _mm512_set1_epi32(x_dword(xb, c + 1)));
      }
      const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      acc[m] = _mm512_fmadd_ps(d, _mm512_mul_ps(_mm512_set1_ps(xb.d), f), acc[m]);  // fma(d, dx * f, acc)
    }
  }
};

// Q4_K (256 values: sub-blocks j of 32, w = d sc_j q - dmin m_j): fields d and dmin; dwords
// 0-2 a row's packed 6-bit scales and mins, dword 3 + 8p + t its qs bytes 32p + 4t .. +3, whose
// low nibbles are values 4t .. 4t+3 of sub-block 2p and high nibbles those of 2p + 1. The chain
// per super-block is the row-major kernels' (kquants.cpp): f_j = float(sum q qx) * sc_j,
// inner = dx_0 f_0, then fma(dx_j, f_j, inner); mins = m_0 s_0, then fma(m_j, s_j, mins);
// acc = fma(d, inner, acc), then fnmadd(dmin, mins, acc).
struct Q4K16 {
  static constexpr int kHeader = 4;
  static constexpr int kSubBlocks = 8;
  // Byte j % 4 of each lane of `packed` (which holds the 6-bit scales, or mins, of sub-blocks
  // 0-3 or 4-7 of the lane's row) as a float: sub-block j's.
  PPINFER_AVX512 static __m512 byte_float(__m512i packed, int j) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(packed, 8 * (j % 4)), _mm512_set1_epi32(0xff)));
  }
  template <int kX>
  PPINFER_AVX512 static void block(const uint8_t* p, const Q8Block* x, int64_t x_stride, __m512* acc) {
    // The scales and mins of the 16 rows, as unpack_scale_min unpacks one row's.
    const __m512i lo = codes16(p, kHeader, 0), mid = codes16(p, kHeader, 1), hi = codes16(p, kHeader, 2);
    const __m512i six = _mm512_set1_epi32(0x3f3f3f3f), four = _mm512_set1_epi32(0x0f0f0f0f);
    const __m512i two = _mm512_set1_epi32(0x03030303);
    const __m512i sc03 = _mm512_and_si512(lo, six), m03 = _mm512_and_si512(mid, six);
    const __m512i sc47 = _mm512_or_si512(_mm512_and_si512(hi, four),
                                         _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(lo, 6), two), 4));
    const __m512i m47 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(hi, 4), four),
                                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(mid, 6), two), 4));
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 inner[kX], mins[kX];
#pragma GCC unroll 4
    for (int pair = 0; pair < kSubBlocks / 2; ++pair) {
      __m512i sum[kX][2];
#pragma GCC unroll 8
      for (int m = 0; m < kX; ++m) sum[m][0] = sum[m][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i v = codes16(p, kHeader, 3 + 8 * pair + t);
        const __m512i even = _mm512_and_si512(v, low4);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 8
        for (int m = 0; m < kX; ++m) {
          const Q8Block* xm = x + m * x_stride;
          sum[m][0] = _mm512_dpbusd_epi32(sum[m][0], even, _mm512_set1_epi32(x_dword(xm[2 * pair], t)));
          sum[m][1] = _mm512_dpbusd_epi32(sum[m][1], odd, _mm512_set1_epi32(x_dword(xm[2 * pair + 1], t)));
        }
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * pair + h;
        const __m512 sc = byte_float(j < 4 ? sc03 : sc47, j), mn = byte_float(j < 4 ? m03 : m47, j);
#pragma GCC unroll 8
        for (int m = 0; m < kX; ++m) {
          const Q8Block& xb = x[m * x_stride + j];
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(sum[m][h]), sc);
          const __m512 dx = _mm512_set1_ps(xb.d), sx = _mm512_set1_ps(xb.s);
          inner[m] = j == 0 ? _mm512_mul_ps(dx, f) : _mm512_fmadd_ps(dx, f, inner[m]);
          mins[m] = j == 0 ? _mm512_mul_ps(mn, sx) : _mm512_fmadd_ps(mn, sx, mins[m]);
        }
      }
    }
    const __m512 d = field16(p, 0), dmin = field16(p, 1);
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) {
      acc[m] = _mm512_fmadd_ps(d, inner[m], acc[m]);
      acc[m] = _mm512_fnmadd_ps(dmin, mins[m], acc[m]);
    }
  }
};

// kXBlocks: 32-value x blocks per weight block.
template <class Block, int kBlockBytes, int kXBlocks = 1>
struct Packed16 {
  template <int kX>
  PPINFER_AVX512 static void run(const uint8_t* w, const Q8Block* x, int64_t x_stride, int blocks, float* acc_io,
                                 int64_t ahead) {
    __m512 acc[kX];
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) acc[m] = _mm512_loadu_ps(acc_io + m * kGroupRows);
    for (int b = 0; b < blocks; ++b, w += kGroupRows * kBlockBytes) {
      prefetch_packed<kBlockBytes>(w, ahead);
      Block::template block<kX>(w, x + b * kXBlocks, x_stride, acc);
    }
#pragma GCC unroll 8
    for (int m = 0; m < kX; ++m) _mm512_storeu_ps(acc_io + m * kGroupRows, acc[m]);
  }
};

#endif  // PPINFER_HAS_AVX512

// A table entry (DotPackedFn) from `Kernel::template run<kX>(w, x, x_stride, blocks, acc, ahead)`,
// whose instantiations carry their instruction set's target attribute.
template <class Kernel>
void dot_packed(const uint8_t* w, const Q8Block* x, int64_t x_stride, int x_rows, int blocks, float* acc,
                int64_t ahead) {
  switch (x_rows) {
    case 1:
      return Kernel::template run<1>(w, x, x_stride, blocks, acc, ahead);
    case 2:
      return Kernel::template run<2>(w, x, x_stride, blocks, acc, ahead);
    case 3:
      return Kernel::template run<3>(w, x, x_stride, blocks, acc, ahead);
    default:
      return Kernel::template run<kMaxXRows>(w, x, x_stride, blocks, acc, ahead);
  }
}

constexpr int kQ4_0Bytes = 18;
constexpr int kQ4_1Bytes = 20;
constexpr int kQ8_0Bytes = 34;
constexpr int kQ4KElems = 256;
constexpr int kQ4KBytes = 144;

template <class Dot>
using Q4_0Half = Nibbles8<1, Dot>;
template <class Dot>
using Q4_1Half = Nibbles8<2, Dot>;

// The AVX2 and AVX-VNNI entries of the 8-row kernel Packed8<Half<Dot>, ...>.
#define PPINFER_PACKED8(Half, ...)                                                      \
  PPINFER_AVX2_FN(dot_packed<Packed8<Half<avx2::MaddubsDot>, __VA_ARGS__>>),            \
      PPINFER_AVXVNNI_FN(dot_packed<avx2::OnAvxVnni<Packed8<Half<avx2::VnniDot>, __VA_ARGS__>>>)

const PackedKernels kPacked[] = {
    {2, kQ8Elems, 1, kQ4_0Bytes, PPINFER_PACKED8(Q4_0Half, kQ4_0Bytes),
     PPINFER_AVX512_FN(dot_packed<Packed16<Nibbles16<1>, kQ4_0Bytes>>)},
    {3, kQ8Elems, 2, kQ4_1Bytes, PPINFER_PACKED8(Q4_1Half, kQ4_1Bytes),
     PPINFER_AVX512_FN(dot_packed<Packed16<Nibbles16<2>, kQ4_1Bytes>>)},
    {8, kQ8Elems, 1, kQ8_0Bytes, PPINFER_PACKED8(Signed8, kQ8_0Bytes),
     PPINFER_AVX512_FN(dot_packed<Packed16<Signed16, kQ8_0Bytes>>)},
    {12, kQ4KElems, 2, kQ4KBytes, PPINFER_PACKED8(Q4K8, kQ4KBytes, kQ4KElems / kQ8Elems),
     PPINFER_AVX512_FN(dot_packed<Packed16<Q4K16, kQ4KBytes, kQ4KElems / kQ8Elems>>)},
};

const PackedKernels* find_packed(int64_t qtype) {
  for (const PackedKernels& t : kPacked) {
    if (t.ggml_type == qtype) return &t;
  }
  return nullptr;
}

// The kernel for the active instruction set, or nullptr (the portable path then multiplies the
// unpacked rows).
DotPackedFn packed_kernel(const PackedKernels& t) {
  if (active_isa() >= Isa::kAvx512Vnni && t.avx512 != nullptr) return t.avx512;
  if (active_isa() == Isa::kAvxVnni && t.avxvnni != nullptr) return t.avxvnni;
  if (active_isa() >= Isa::kAvx2) return t.avx2;
  return nullptr;
}

// ---- ops ----

struct PackedShape {
  const PackedKernels* kernels;
  int64_t nb;         // weight blocks per row
  int64_t xb;         // 32-value x blocks per row
  int64_t groups;     // packed groups of kGroupRows rows
  int64_t row_bytes;  // row-major bytes per row

  int64_t unit() const { return xb / nb; }  // x blocks per weight block
};

PackedShape packed_shape(const char* op, int64_t qtype, int64_t k, int64_t n) {
  const PackedKernels* t = find_packed(qtype);
  TORCH_CHECK(t != nullptr, op, ": GGML type ", qtype, " has no packed layout");
  TORCH_CHECK(k > 0 && k % t->block_elems == 0 && k <= (int64_t{1} << 30), op, ": k=", k,
              " is not a positive multiple of ", t->block_elems, " up to 2^30");
  TORCH_CHECK(n >= 0, op, ": n=", n, " is negative");
  const int64_t nb = k / t->block_elems;
  return {t, nb, k / kQ8Elems, (n + kGroupRows - 1) / kGroupRows, nb * t->block_bytes};
}

void check_packed(const char* op, const at::Tensor& wp, const PackedShape& s) {
  TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kByte && wp.dim() == 2 && wp.is_contiguous(), op,
              ": packed weights must be a contiguous 2-D uint8 CPU tensor, got ", wp.scalar_type(), " ", wp.sizes());
  TORCH_CHECK(wp.size(0) == s.groups && wp.size(1) == s.nb * packed_block_bytes(*s.kernels), op,
              ": packed weights have shape ", wp.sizes(), ", expected [", s.groups, ", ",
              s.nb * packed_block_bytes(*s.kernels), "]");
}

// pack_rows(w [n, row_bytes], qtype, k) -> [ceil(n / 16), 16 * row_bytes]
at::Tensor pack_rows(const at::Tensor& w, int64_t qtype, int64_t k) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
              "pack_rows: w must be 2-D uint8 blocks on the CPU, got ", w.scalar_type(), " ", w.sizes());
  const PackedShape s = packed_shape("pack_rows", qtype, k, w.size(0));
  TORCH_CHECK(w.size(1) == s.row_bytes, "pack_rows: w has ", w.size(1), " bytes per row; k=", k, " takes ",
              s.row_bytes);
  const at::Tensor rows = w.contiguous();
  at::Tensor out = empty_on_huge_pages({s.groups, s.nb * packed_block_bytes(*s.kernels)});
  const int64_t n = w.size(0);
  at::parallel_for(0, s.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      pack_group(*s.kernels, rows.data_ptr<uint8_t>(), s.row_bytes, n, g, s.nb, out.data_ptr<uint8_t>() + g * out.size(1));
    }
  });
  return out;
}

// unpack_rows(wp, qtype, k, n) -> the row-major [n, row_bytes] blocks pack_rows took.
at::Tensor unpack_rows(const at::Tensor& wp, int64_t qtype, int64_t k, int64_t n) {
  const PackedShape s = packed_shape("unpack_rows", qtype, k, n);
  check_packed("unpack_rows", wp, s);
  at::Tensor out = at::empty({n, s.row_bytes}, wp.options());
  at::parallel_for(0, s.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      unpack_group(*s.kernels, wp.data_ptr<uint8_t>() + g * wp.size(1), s.row_bytes, n, g, s.nb, out.data_ptr<uint8_t>());
    }
  });
  return out;
}

// out[m, j] for the groups [g0, g1): each group's chains over the k-chunks, kMaxXRows x rows a
// call, then the bias.
template <typename Out>
void packed_dot_groups(const PackedShape& s, DotPackedFn dot, const uint8_t* wp, const Q8Block* xq, int64_t rows,
                       int64_t n, const float* bias, int64_t g0, int64_t g1, Out* out) {
  const int64_t group_bytes = s.nb * packed_block_bytes(*s.kernels);
  const int64_t chunk = rows == 1 ? s.nb : std::min(s.nb, std::max<int64_t>(1, kChunkBlocks / s.unit()));
  // Prefetch the next group's block while this one's is used, once per block (by the first x rows).
  const int64_t ahead = group_bytes;
  std::vector<float> acc(static_cast<size_t>(rows * kGroupRows));  // [m, group row]
  for (int64_t g = g0; g < g1; ++g) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const uint8_t* group = wp + g * group_bytes;
    for (int64_t c0 = 0; c0 < s.nb; c0 += chunk) {
      const int blocks = static_cast<int>(std::min(chunk, s.nb - c0));
      for (int64_t m = 0; m < rows; m += kMaxXRows) {
        const int x_rows = static_cast<int>(std::min<int64_t>(kMaxXRows, rows - m));
        dot(group + c0 * packed_block_bytes(*s.kernels), xq + m * s.xb + c0 * s.unit(), s.xb, x_rows, blocks,
            acc.data() + m * kGroupRows, m == 0 && g + 1 < g1 ? ahead : 0);
      }
    }
    const int64_t count = std::min<int64_t>(kGroupRows, n - g * kGroupRows);
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t i = 0; i < count; ++i) {
        const int64_t j = g * kGroupRows + i;
        out[m * n + j] = static_cast<Out>(acc[m * kGroupRows + i] + (bias != nullptr ? bias[j] : 0.0f));
      }
    }
  }
}

}  // namespace

// packed_matmul(x [..., k], wp, qtype, k, n, bias) = block_matmul(x, unpack_rows(wp, qtype, k, n),
// qtype, k, bias), the same bits; where the active instruction set has no packed kernel (the
// portable path) it is computed exactly so.
at::Tensor packed_matmul(const at::Tensor& x_in, const at::Tensor& wp, int64_t qtype, int64_t k, int64_t n,
                         const std::optional<at::Tensor>& bias) {
  const PackedShape s = packed_shape("packed_matmul", qtype, k, n);
  check_packed("packed_matmul", wp, s);
  const DotPackedFn dot = packed_kernel(*s.kernels);
  if (dot == nullptr) return block_matmul(x_in, unpack_rows(wp, qtype, k, n), qtype, k, bias);
  TORCH_CHECK(x_in.device().is_cpu() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16) &&
                  x_in.dim() >= 1 && x_in.size(-1) == k,
              "packed_matmul: x must be a float32 or bfloat16 CPU tensor [..., k=", k, "], got ", x_in.scalar_type(),
              " ", x_in.sizes());
  std::optional<at::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "packed_matmul: bias must be [", n, "], got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = n;
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();  // [M, k]
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty(out_sizes, x.options());  // [..., n]
  if (rows == 0 || n == 0) return out;
  const Q8Block* xq = quantize_activations(x, k);
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (k * rows * kGroupRows));
  const uint8_t* w = wp.data_ptr<uint8_t>();
  at::parallel_for(0, s.groups, grain, [&](int64_t g0, int64_t g1) {
    if (x.scalar_type() == at::kFloat) {
      packed_dot_groups(s, dot, w, xq, rows, n, bp, g0, g1, out.data_ptr<float>());
    } else {
      packed_dot_groups(s, dot, w, xq, rows, n, bp, g0, g1, out.data_ptr<at::BFloat16>());
    }
  });
  return out;
}

// packed_experts_matmul(x [M, k], wp [E, groups, group_bytes], qtype, k, n, counts [E]) =
// experts_matmul(x, the experts' unpacked rows, qtype, k, counts), the same bits: x sorted by
// expert, counts[e] rows each; the threads split every active expert's groups at once.
at::Tensor packed_experts_matmul(const at::Tensor& x_in, const at::Tensor& wp, int64_t qtype, int64_t k, int64_t n,
                                 const at::Tensor& counts_in) {
  const PackedShape s = packed_shape("packed_experts_matmul", qtype, k, n);
  TORCH_CHECK(wp.dim() == 3 && wp.size(0) > 0, "packed_experts_matmul: packed experts must be [n_expert > 0, ",
              s.groups, ", ", s.nb * packed_block_bytes(*s.kernels), "], got ", wp.sizes());
  check_packed("packed_experts_matmul", wp.select(0, 0), s);
  TORCH_CHECK(wp.is_contiguous(), "packed_experts_matmul: packed experts must be contiguous");
  const int64_t experts = wp.size(0);
  const DotPackedFn dot = packed_kernel(*s.kernels);
  if (dot == nullptr) {
    std::vector<at::Tensor> rows;
    for (int64_t e = 0; e < experts; ++e) rows.push_back(unpack_rows(wp.select(0, e), qtype, k, n));
    return experts_matmul(x_in, at::stack(rows), qtype, k, counts_in);
  }
  TORCH_CHECK(x_in.device().is_cpu() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16) &&
                  x_in.dim() == 2 && x_in.size(1) == k,
              "packed_experts_matmul: x must be a float32 or bfloat16 CPU tensor [M, k=", k, "], got ",
              x_in.scalar_type(), " ", x_in.sizes());
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == experts, "packed_experts_matmul: counts must be [n_expert=",
              experts, "], got ", counts_in.sizes());
  const at::Tensor c = counts_in.to(at::kLong).contiguous();
  std::vector<int64_t> first(static_cast<size_t>(experts) + 1, 0);  // expert e's x rows: [first[e], first[e + 1])
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t count = c.data_ptr<int64_t>()[e];
    TORCH_CHECK(count >= 0, "packed_experts_matmul: a negative count ", count);
    first[e + 1] = first[e] + count;
  }
  TORCH_CHECK(first[experts] == x_in.size(0), "packed_experts_matmul: counts sum to ", first[experts], ", x has ",
              x_in.size(0), " rows");
  const at::Tensor x = x_in.contiguous();  // [M, k]
  at::Tensor out = at::empty({x.size(0), n}, x.options());  // [M, n] in x's dtype
  if (x.size(0) == 0 || n == 0) return out;
  const Q8Block* xq = quantize_activations(x, k);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < experts; ++e) {
    if (first[e + 1] > first[e]) active.push_back(e);
  }
  // Work units: (active expert, group), an expert's groups in a row.
  const int64_t units = static_cast<int64_t>(active.size()) * s.groups;
  const int64_t typical_rows = std::max<int64_t>(1, x.size(0) / static_cast<int64_t>(active.size()));
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (k * typical_rows * kGroupRows));
  const int64_t expert_bytes = wp.stride(0);
  const uint8_t* w = wp.data_ptr<uint8_t>();
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      const int64_t e = active[static_cast<size_t>(u / s.groups)];
      const int64_t g0 = u % s.groups, g1 = std::min(s.groups, g0 + (u1 - u));
      const int64_t m0 = first[e], rows = first[e + 1] - first[e];
      if (x.scalar_type() == at::kFloat) {
        packed_dot_groups(s, dot, w + e * expert_bytes, xq + m0 * s.xb, rows, n, nullptr, g0, g1,
                          out.data_ptr<float>() + m0 * n);
      } else {
        packed_dot_groups(s, dot, w + e * expert_bytes, xq + m0 * s.xb, rows, n, nullptr, g0, g1,
                          out.data_ptr<at::BFloat16>() + m0 * n);
      }
      u += g1 - g0;
    }
  });
  return out;
}

// The types with a packed layout (pack_rows, unpack_rows and the products take them all); with
// `runnable`, only those whose packed products have a kernel on the active instruction set
// (the others unpack and take the row-major path).
namespace {

std::vector<int64_t> packed_qtypes(bool runnable) {
  std::vector<int64_t> types;
  for (const PackedKernels& t : kPacked) {
    if (!runnable || packed_kernel(t) != nullptr) types.push_back(t.ggml_type);
  }
  return types;
}

}  // namespace
}  // namespace ppinfer

TORCH_LIBRARY_FRAGMENT(ppinfer_kernels, m) {
  m.def("pack_rows(Tensor w, int qtype, int k) -> Tensor", &ppinfer::pack_rows);
  m.def("unpack_rows(Tensor wp, int qtype, int k, int n) -> Tensor", &ppinfer::unpack_rows);
  m.def("packed_matmul(Tensor x, Tensor wp, int qtype, int k, int n, Tensor? bias=None) -> Tensor",
        &ppinfer::packed_matmul);
  m.def("packed_experts_matmul(Tensor x, Tensor wp, int qtype, int k, int n, Tensor counts) -> Tensor",
        &ppinfer::packed_experts_matmul);
  m.def("packed_qtypes(bool runnable=False) -> int[]", &ppinfer::packed_qtypes);
}
