// Block kernels over GGUF's stored formats: the contract between the per-type files
// (legacy.cpp: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0; kquants.cpp: Q4_K Q5_K Q6_K; lowbit.cpp: Q2_K Q3_K
// MXFP4) and ops.cpp, which
// quantizes activations, splits rows over torch's intra-op threads and registers the ops.
//
// Every weight row is `k` values stored as k / block_elems consecutive GGUF blocks, byte for
// byte as in the file. Activations are quantized once per product to Q8Block (32 values, one
// float scale): the same scheme for every weight type, at least as fine as llama.cpp's.
#pragma once

#include <cstdint>
#include <cstring>

// x86-64 builds carry AVX2 functions (marked PPINFER_AVX2, compiled for AVX2 whatever the
// file's flags, run only where the CPU has it); elsewhere a table's AVX2 entries are nullptr.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PPINFER_X86 1
#if defined(__GNUC__) || defined(__clang__)
#define PPINFER_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PPINFER_AVX2
#endif
#define PPINFER_AVX2_FN(...) __VA_ARGS__
#else
#define PPINFER_AVX2_FN(...) nullptr
#endif

// The AVX-512 functions (PPINFER_AVX512: F, BW, VL and VNNI, run only where the CPU has them all)
// need a compiler that knows VNNI's target name (GCC 8, clang 6); elsewhere their entries are
// nullptr and the AVX2 code serves.
#if defined(PPINFER_X86) && ((defined(__clang__) && __clang_major__ >= 6) || \
                             (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8))
#define PPINFER_HAS_AVX512 1
#define PPINFER_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define PPINFER_AVX512_FN(...) __VA_ARGS__
#else
#define PPINFER_AVX512_FN(...) nullptr
#endif

// The AVX-VNNI functions (PPINFER_AVXVNNI: AVX2, FMA, F16C and the VEX-encoded 256-bit dpbusd,
// run only where the CPU has them) need a compiler that knows the target name (GCC 11, clang
// 12); elsewhere their entries are nullptr and the AVX2 code serves. They are the AVX2 kernels
// over another integer dot (avx2::VnniDot): an entry (PPINFER_AVXVNNI_ENTRY) is flattened, so
// the AVX2 bodies it calls, and the VNNI dots they call, are all compiled into it.
#if defined(PPINFER_X86) && ((defined(__clang__) && __clang_major__ >= 12) || \
                             (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define PPINFER_HAS_AVXVNNI 1
#define PPINFER_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define PPINFER_AVXVNNI_ENTRY __attribute__((target("avx2,fma,f16c,avxvnni"), flatten))
#define PPINFER_AVXVNNI_FN(...) __VA_ARGS__
#else
#define PPINFER_AVXVNNI_FN(...) nullptr
#endif

namespace ppinfer {

// Whether the AVX2 code runs now: the CPU has AVX2, FMA and F16C and set_isa did not force
// the portable code (ops.cpp).
bool avx2_active();

constexpr int kQ8Elems = 32;

// 32 activations x[i] ~= d * q[i]; s = d * sum(q) serves types whose blocks carry an offset.
struct Q8Block {
  float d;
  float s;
  int8_t q[kQ8Elems];
};

// sum_i w[i] * x[i] for one stored row of `k` values and its k / 32 activation blocks.
using VecDotFn = float (*)(const uint8_t* w_row, const Q8Block* x, int k);
// One stored row of `k` values to float32.
using DequantRowFn = void (*)(const uint8_t* w_row, float* out, int k);

// ---- the AVX2 dots: one float chain per output ----
//
// Every output y[m][n] (x row m, weight row n) is one float chain over its 32-value blocks b, in
// order: the block's exact integer dot isum_b = sum q * qx becomes one float, f_b, and the
// type's update (written next to each type's kernels) folds f_b and the block's scales into the
// output's accumulator `acc`, with the same float operations (fma where it says fma) for every
// output. The kernels hold one output's chain in each lane of a vector: the lanes are 8 weight
// rows against one x row (dot_weight_rows), one weight row against 8 x rows (dot_tile) or two
// weight rows against 4 x rows (dot_pair_tile), and the chain of an output is the same in each:
// a row's result does not depend on the number of x rows in the product, on which kernel
// computed it, on how the weight rows were split between threads or on how k was cut into
// chunks (the caller passes acc from one chunk to the next). Reusing a decoded weight block for
// several x rows changes only integer work, which is exact.
constexpr int kLanes = 8;

// 8 x rows' activation blocks b, interleaved for dot_tile: lane r of each vector is x row r.
struct alignas(32) Q8Tile {
  int8_t q[kQ8Elems / 4][kLanes][4];  // q[t][r]: values 4t .. 4t+3 of x row r
  float d[kLanes];
  float s[kLanes];
  int16_t half_sums[kLanes][2];  // x row r's sum(q) over values 0..15 and 16..31 (Q6_K)
};

// The same for 4 x rows (dot_pair_tile: lanes r and 4 + r are x row r against two weight rows).
struct alignas(16) Q8Tile4 {
  int8_t q[kQ8Elems / 4][kLanes / 2][4];
  float d[kLanes / 2];
  float s[kLanes / 2];
  int16_t half_sums[kLanes / 2][2];
};

// acc[m * kLanes + j] (in / out): chains of the weight rows rows[j] (j < kLanes; the same row may
// repeat) against x_rows (1 or kMaxWeightRowsX) x rows, x row m's blocks at x + m * x_stride,
// over this chunk's `k` values (the rows point at the chunk's first block). Each weight block
// read also prefetches the one `ahead` bytes past it (0: none).
constexpr int kMaxWeightRowsX = 2;
using DotWeightRowsFn = void (*)(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int x_rows, int k,
                                 float* acc, int64_t ahead);
// acc[g * kLanes + r] (in / out): the chains of one weight row (at the chunk's first block)
// against `groups` (1 to kMaxTileGroups) groups of 8 x rows, group g's tiles at x + g * stride;
// prefetching as above.
constexpr int kMaxTileGroups = 3;
using DotTileFn = void (*)(const uint8_t* w, const Q8Tile* x, int64_t stride, int groups, int k, float* acc,
                           int64_t ahead);

// acc[i * 4 + r] (in / out): the chains of the weight rows w (i = 0) and w + w_stride (i = 1)
// against 4 x rows; prefetching as above.
using DotPairTileFn = void (*)(const uint8_t* w, int64_t w_stride, const Q8Tile4* x, int k, float* acc,
                               int64_t ahead);

// The same for 16 x rows (the AVX-512 tile kernels: lane r of each 512-bit vector is x row r).
constexpr int kWideLanes = 16;
struct alignas(64) Q8Tile16 {
  int8_t q[kQ8Elems / 4][kWideLanes][4];  // q[t][r]: values 4t .. 4t+3 of x row r
  float d[kWideLanes];
  float s[kWideLanes];
  int32_t half_sums[2][kWideLanes];  // x row r's sum(q) over values 0..15 and 16..31
};

// acc[g * kWideLanes + r] (in / out): the chains of one weight row (at the chunk's first block)
// against `groups` (1 to kMaxWideGroups) groups of 16 x rows, group g's tiles at x + g * stride;
// each weight block read prefetches the one `ahead` bytes past it (0: none). Every lane does the
// float operations of the AVX2 kernels' lanes, in the same order, so the results are the same bits.
constexpr int kMaxWideGroups = 4;
using DotTile16Fn = void (*)(const uint8_t* w, const Q8Tile16* x, int64_t stride, int groups, int k, float* acc,
                             int64_t ahead);

struct QTypeKernels {
  int ggml_type;        // GGMLQuantizationType value (Q4_0 = 2, ..., Q6_K = 14)
  int block_elems;      // values per stored block (32, or 256 for K-quants)
  int block_bytes;      // bytes per stored block
  VecDotFn dot_scalar;  // portable C++: runs on any CPU, and is the reference for the SIMD ones
  DequantRowFn dequant; // portable C++ (the compiler may vectorize it)
  // Compiled with __attribute__((target("avx2,fma,f16c"))); nullptr where there are none.
  DotWeightRowsFn dot_weight_rows_avx2;
  DotTileFn dot_tile_avx2;
  DotPairTileFn dot_pair_tile_avx2;
  // Compiled with PPINFER_AVX512; nullptr where the compiler cannot.
  DotTile16Fn dot_tile16_avx512;
  DotWeightRowsFn dot_weight_rows_avx512;  // the AVX2 weight-rows lanes, integer dots by VNNI
  // The AVX2 kernels with AVX-VNNI's integer dots (the same bits); nullptr where there are none
  // (the AVX2 ones serve) or the compiler cannot.
  DotWeightRowsFn dot_weight_rows_avxvnni;
  DotTileFn dot_tile_avxvnni;
  DotPairTileFn dot_pair_tile_avxvnni;
};

#if defined(PPINFER_X86)
// These entries carry the AVX2 target, so an AVX2 kernel is compiled into them; they serve the
// AVX-VNNI entries too, with Kernel = avx2::OnAvxVnni<...> (whose functions carry that target).

// A table's dot_weight_rows_avx2 entry from `Kernel::template weight_rows<kXRows>(rows, x,
// x_stride, k, acc, ahead)`.
template <class Kernel>
PPINFER_AVX2 void dot_weight_rows_avx2(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride, int x_rows,
                                       int k, float* acc, int64_t ahead) {
  if (x_rows == 1) return Kernel::template weight_rows<1>(rows, x, x_stride, k, acc, ahead);
  return Kernel::template weight_rows<kMaxWeightRowsX>(rows, x, x_stride, k, acc, ahead);
}

// A table's dot_tile_avx2 entry from `Kernel::template tile<kGroups>(w, x, stride, k, acc, ahead)`.
template <class Kernel>
PPINFER_AVX2 void dot_tile_avx2(const uint8_t* w, const Q8Tile* x, int64_t stride, int groups, int k, float* acc,
                                int64_t ahead) {
  switch (groups) {
    case 1:
      return Kernel::template tile<1>(w, x, stride, k, acc, ahead);
    case 2:
      return Kernel::template tile<2>(w, x, stride, k, acc, ahead);
    default:
      return Kernel::template tile<kMaxTileGroups>(w, x, stride, k, acc, ahead);
  }
}

// A table's dot_pair_tile_avx2 entry from the same kernel's `pair_tile(w, w_stride, x, k, acc, ahead)`.
template <class Kernel>
PPINFER_AVX2 void dot_pair_tile_avx2(const uint8_t* w, int64_t w_stride, const Q8Tile4* x, int k, float* acc,
                                     int64_t ahead) {
  Kernel::pair_tile(w, w_stride, x, k, acc, ahead);
}
#endif

#if defined(PPINFER_HAS_AVX512)
// A table's dot_tile16_avx512 entry from `Kernel::template tile16<kGroups>(w, x, stride, k, acc, ahead)`.
template <class Kernel>
PPINFER_AVX512 void dot_tile16_avx512(const uint8_t* w, const Q8Tile16* x, int64_t stride, int groups, int k,
                                      float* acc, int64_t ahead) {
  switch (groups) {
    case 1:
      return Kernel::template tile16<1>(w, x, stride, k, acc, ahead);
    case 2:
      return Kernel::template tile16<2>(w, x, stride, k, acc, ahead);
    case 3:
      return Kernel::template tile16<3>(w, x, stride, k, acc, ahead);
    default:
      return Kernel::template tile16<kMaxWideGroups>(w, x, stride, k, acc, ahead);
  }
}

// A table's dot_weight_rows_avx512 entry from `Kernel::template weight_rows<kXRows>(...)`, as
// dot_weight_rows_avx2's.
template <class Kernel>
PPINFER_AVX512 void dot_weight_rows_avx512(const uint8_t* const* rows, const Q8Block* x, int64_t x_stride,
                                           int x_rows, int k, float* acc, int64_t ahead) {
  if (x_rows == 1) return Kernel::template weight_rows<1>(rows, x, x_stride, k, acc, ahead);
  return Kernel::template weight_rows<kMaxWeightRowsX>(rows, x, x_stride, k, acc, ahead);
}
#endif

// Tables defined by the per-type files; `count` entries each.
extern const QTypeKernels kLegacyKernels[];
extern const int kLegacyKernelCount;
extern const QTypeKernels kKQuantKernels[];
extern const int kKQuantKernelCount;
extern const QTypeKernels kLowBitKernels[];  // lowbit.cpp: Q2_K, Q3_K, MXFP4
extern const int kLowBitKernelCount;

// IEEE half to float, without any CPU feature.
inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exp = 113;
    while ((mant & 0x400) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float load_fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return fp16_to_fp32(h);
}

}  // namespace ppinfer
