// Block kernels over GGUF's stored formats: the contract between the per-type files
// (legacy.cpp: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0; kquants.cpp: Q4_K Q5_K Q6_K) and ops.cpp, which
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

namespace ppinfer {

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
// out[r] = sum_i w[i] * x_r[i] for r < rows <= kMaxDotRows, x_r = x + r * x_stride (in blocks):
// one weight row against several activation rows, each weight block decoded once.
constexpr int kMaxDotRows = 4;
using VecDotRowsFn = void (*)(const uint8_t* w_row, const Q8Block* x, int64_t x_stride, int rows, int k, float* out);
// out[r] = sum_i w_r[i] * x[i] for r < kDotWeightRows, w_r = w + r * w_stride (in bytes): several
// weight rows against one activation row, one independent sum per weight row, so decode (one
// activation row) pays one call per kDotWeightRows rows and the rows' sums overlap in the CPU.
constexpr int kDotWeightRows = 4;
using VecDotWeightRowsFn = void (*)(const uint8_t* w, int64_t w_stride, const Q8Block* x, int k, float* out);

struct QTypeKernels {
  int ggml_type;        // GGMLQuantizationType value (Q4_0 = 2, ..., Q6_K = 14)
  int block_elems;      // values per stored block (32, or 256 for K-quants)
  int block_bytes;      // bytes per stored block
  VecDotFn dot_scalar;  // portable C++: runs on any CPU, and is the reference for the SIMD one
  VecDotFn dot_avx2;    // compiled with __attribute__((target("avx2,fma,f16c"))); nullptr if none
  DequantRowFn dequant; // portable C++ (the compiler may vectorize it)
  // Optional (may be left out of an initializer, then nullptr): AVX2 like dot_avx2, for
  // several activation rows; ops.cpp calls dot_avx2 once per row where it is missing.
  VecDotRowsFn dot_rows_avx2;
  // Optional: AVX2 like dot_avx2, for kDotWeightRows weight rows against one activation row;
  // each row's sum must be dot_avx2's bit for bit. ops.cpp calls dot_avx2 per row where missing.
  VecDotWeightRowsFn dot_weight_rows_avx2;
};

#if defined(PPINFER_X86)
// A table's dot_avx2 and dot_rows_avx2 entries from one kernel: `Kernel::template
// rows<kRows>(w, x, x_stride, k, out)` dots one weight row with kRows activation rows, each
// row's sum formed the same way for every kRows (so a row's result never depends on its batch).
template <class Kernel>
PPINFER_AVX2 float dot_avx2(const uint8_t* w, const Q8Block* x, int k) {
  float out;
  Kernel::template rows<1>(w, x, 0, k, &out);
  return out;
}

template <class Kernel>
PPINFER_AVX2 void dot_rows_avx2(const uint8_t* w, const Q8Block* x, int64_t x_stride, int rows, int k, float* out) {
  switch (rows) {
    case 1:
      return Kernel::template rows<1>(w, x, x_stride, k, out);
    case 2:
      return Kernel::template rows<2>(w, x, x_stride, k, out);
    case 3:
      return Kernel::template rows<3>(w, x, x_stride, k, out);
    default:
      return Kernel::template rows<kMaxDotRows>(w, x, x_stride, k, out);
  }
}
#endif

// Tables defined by the per-type files; `count` entries each.
extern const QTypeKernels kLegacyKernels[];
extern const int kLegacyKernelCount;
extern const QTypeKernels kKQuantKernels[];
extern const int kKQuantKernelCount;

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
