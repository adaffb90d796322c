// Torch ops over stored GGUF blocks (namespace ppinfer_kernels), on the per-type kernels of
// legacy.cpp and kquants.cpp.
//
// block_matmul(x [..., k], w [N, row_bytes]) = x @ dequant(w).T, two ways:
//   - fewer than gemm_min_rows() rows of x (decode): each x row is quantized once to
//     Q8Blocks, then torch's intra-op threads split the weight rows and dot each one with
//     every x row while it is in cache (the weights are read once, in their stored size; a
//     type's multi-row kernel decodes each weight block once for up to kMaxDotRows x rows; with
//     one x row, its weight-rows kernel dots kDotWeightRows weight rows per call instead, and
//     the weights are prefetched ahead of the dots);
//   - more rows (prefill): tiles of weight rows are dequantized into one reused float buffer
//     and multiplied by torch's float GEMM, so the cost is the float GEMM's plus one pass of
//     dequantization, with memory bounded by the tile.
// The AVX2 dots run only where the CPU reports AVX2, FMA and F16C; set_isa("scalar") forces
// the portable ones on any CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qtypes.h"


namespace ppinfer {
namespace {

// Rows of x from which block_matmul uses the tile-dequant GEMM (measured: docs/kernels.md).
constexpr int64_t kDefaultGemmMinRows = 24;
// Float values per dequantized weight tile (4 MiB), and the fewest rows a tile holds.
constexpr int64_t kTileValues = int64_t{1} << 20;
constexpr int64_t kMinTileRows = 16;
// Multiply-adds below which a chunk of work is not split further between threads.
constexpr int64_t kGrainMacs = int64_t{1} << 15;
// Activation blocks per k-chunk of the decode path (1024 values: 1.25 KB a row of x, so the
// chunks of up to kDefaultGemmMinRows rows stay in L1), and the weight rows sharing each chunk.
// The chunk does not depend on the number of x rows, so a row's result is the same whatever
// batch it is computed in (pipelines with different lane sizes give identical outputs).
constexpr int64_t kXChunkBlocks = 32;
constexpr int64_t kRowGroup = 8;
// How far ahead of the rows being dotted decode prefetches weights, in bytes. A decode product
// streams its weights from L3 or memory once; the rows are short, so the hardware prefetcher
// alone leaves the dots waiting on loads (measured: docs/kernels.md, "One x row").
constexpr int64_t kPrefetchAhead = 8192;
constexpr int64_t kCacheLine = 64;

bool cpu_has_avx2() {
#if defined(PPINFER_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<bool>& avx2_enabled() {
  static std::atomic<bool> enabled{cpu_has_avx2()};
  return enabled;
}

std::atomic<int64_t>& gemm_rows_threshold() {
  static std::atomic<int64_t> rows{kDefaultGemmMinRows};
  return rows;
}

const QTypeKernels* find_kernels(int64_t qtype) {
  for (int i = 0; i < kLegacyKernelCount; ++i) {
    if (kLegacyKernels[i].ggml_type == qtype) return &kLegacyKernels[i];
  }
  for (int i = 0; i < kKQuantKernelCount; ++i) {
    if (kKQuantKernels[i].ggml_type == qtype) return &kKQuantKernels[i];
  }
  return nullptr;
}

// The dot products for the selected ISA: one weight row against x rows, up to kMaxDotRows at a
// time where the type has a multi-row kernel, else one at a time.
struct Dots {
  VecDotFn one;
  VecDotRowsFn rows;                // nullptr: call `one` per row
  VecDotWeightRowsFn weight_rows;  // nullptr: call `one` per weight row

  void run(const uint8_t* w, const Q8Block* x, int64_t x_stride, int64_t count, int k, float* out) const {
    if (rows != nullptr && count > 1) {
      for (int64_t m = 0; m < count; m += kMaxDotRows) {
        const int n = static_cast<int>(std::min<int64_t>(kMaxDotRows, count - m));
        rows(w, x + m * x_stride, x_stride, n, k, out + m);
      }
      return;
    }
    for (int64_t m = 0; m < count; ++m) out[m] = one(w, x + m * x_stride, k);
  }
};

Dots dots_for(const QTypeKernels& t) {
  if (avx2_enabled().load(std::memory_order_relaxed) && t.dot_avx2 != nullptr) {
    return {t.dot_avx2, t.dot_rows_avx2, t.dot_weight_rows_avx2};
  }
  return {t.dot_scalar, nullptr, nullptr};
}

// ---- activation quantization: 32 floats -> Q8Block (d = max|x| / 127, q = round(x / d)) ----

void quantize_row_scalar(const float* x, Q8Block* out, int64_t k) {
  for (int64_t b = 0; b < k / kQ8Elems; ++b, x += kQ8Elems) {
    float amax = 0.0f;
    for (int j = 0; j < kQ8Elems; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < kQ8Elems; ++j) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(x[j] * id));
      out[b].q[j] = static_cast<int8_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

#ifdef PPINFER_X86
// The same blocks as quantize_row_scalar (same products, same round-to-nearest-even).
PPINFER_AVX2 void quantize_row_avx2(const float* x, Q8Block* out, int64_t k) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / kQ8Elems; ++b, x += kQ8Elems) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // int32 -> int8 with packs, which interleave 128-bit lanes; the permute restores order.
    const __m256i q01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i q23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q), bytes);
    const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    out[b].d = d;
    out[b].s = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}
#endif

void quantize_row(const float* x, Q8Block* out, int64_t k) {
#ifdef PPINFER_X86
  if (avx2_enabled().load(std::memory_order_relaxed)) {
    quantize_row_avx2(x, out, k);
    return;
  }
#endif
  quantize_row_scalar(x, out, k);
}

// All rows of x ([M, k], float32 or bfloat16) as Q8Blocks, into a buffer reused by the thread.
const Q8Block* quantize_activations(const at::Tensor& x, int64_t k) {
  thread_local std::vector<Q8Block> blocks;
  thread_local std::vector<float> row;
  const int64_t rows = x.size(0);
  const int64_t nb = k / kQ8Elems;
  blocks.resize(static_cast<size_t>(rows * nb));
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) quantize_row(xp + m * k, blocks.data() + m * nb, k);
  } else {
    const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
    row.resize(static_cast<size_t>(k));
    for (int64_t m = 0; m < rows; ++m) {
      std::copy(xp + m * k, xp + (m + 1) * k, row.begin());
      quantize_row(row.data(), blocks.data() + m * nb, k);
    }
  }
  return blocks.data();
}

// ---- argument checks ----

struct Shape {
  const QTypeKernels* kernels;
  int64_t n;          // weight rows (output features)
  int64_t row_bytes;  // stored bytes per weight row
};

Shape check_weight(const char* op, const at::Tensor& w, int64_t qtype, int64_t k) {
  const QTypeKernels* t = find_kernels(qtype);
  TORCH_CHECK(t != nullptr, op, ": no CPU block kernel for GGML type ", qtype);
  TORCH_CHECK(k > 0 && k % t->block_elems == 0, op, ": k=", k, " is not a positive multiple of the ",
              t->block_elems, "-value blocks of GGML type ", qtype);
  TORCH_CHECK(k <= (int64_t{1} << 30), op, ": k=", k, " is too large");
  TORCH_CHECK(w.device().is_cpu(), op, ": w must be on the CPU, got ", w.device());
  TORCH_CHECK(w.scalar_type() == at::kByte, op, ": w must be uint8 blocks, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, op, ": w must be [N, row_bytes], got ", w.dim(), " dimensions");
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
  const int64_t row_bytes = k / t->block_elems * t->block_bytes;
  TORCH_CHECK(w.size(1) == row_bytes, op, ": w has ", w.size(1), " bytes per row; a row of k=", k,
              " values of GGML type ", qtype, " takes ", row_bytes);
  return {t, w.size(0), row_bytes};
}

void check_activations(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "block_matmul: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "block_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "block_matmul: x must be [..., k=", k, "], got ", x.sizes());
}

// The bias as a contiguous float32 [n] (a bfloat16 bias, as after module.to(bfloat16), is
// widened), or nothing.
std::optional<at::Tensor> checked_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return std::nullopt;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu() && (b.scalar_type() == at::kFloat || b.scalar_type() == at::kBFloat16) &&
                  b.dim() == 1 && b.size(0) == n,
              "block_matmul: bias must be a float32 or bfloat16 CPU tensor [", n, "], got ", b.scalar_type(), " ",
              b.sizes(), " on ", b.device());
  return b.to(at::kFloat).contiguous();
}

// ---- the two paths ----

void dequantize_rows(const QTypeKernels& t, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t k,
                     float* out) {
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / k);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) t.dequant(w + r * row_bytes, out + r * k, static_cast<int>(k));
  });
}

// Asks for the weight rows kPrefetchAhead bytes past rows [j, j + count) to be loaded (not
// past row j1), without waiting for them.
inline void prefetch_ahead(const uint8_t* w, int64_t row_bytes, int64_t j, int64_t count, int64_t j1) {
#if defined(__GNUC__) || defined(__clang__)
  const int64_t begin = j * row_bytes + kPrefetchAhead;
  const int64_t end = std::min(j1 * row_bytes, begin + count * row_bytes);
  for (int64_t i = begin; i < end; i += kCacheLine) __builtin_prefetch(w + i);
#endif
}

// How k is cut into chunks: a row's dot is the float sum, in order, of its chunks' dots (each
// starting from zero), on every path, so that all paths give the same bits.
struct KChunks {
  int64_t nb;           // x blocks per row
  int64_t chunk;        // x blocks per chunk
  int64_t chunk_bytes;  // stored weight bytes per chunk

  explicit KChunks(const QTypeKernels& t, int64_t k) : nb(k / kQ8Elems) {
    const int64_t unit = t.block_elems / kQ8Elems;  // x blocks per weight block
    chunk = std::max(unit, kXChunkBlocks / unit * unit);
    chunk_bytes = chunk / unit * t.block_bytes;
  }
  int values(int64_t c0) const { return static_cast<int>(std::min(chunk, nb - c0) * kQ8Elems); }
};

// out[j] for one x row (decode), weight rows [j0, j1): kDotWeightRows weight rows per call
// where the type has that kernel, so the per-call and per-sum costs, which dominate short
// rows, are shared by several rows. Sums each chunk like vec_dot_rows: the same bits.
template <typename Out>
void vec_dot_one_x_row(const Shape& s, const Dots& dots, const uint8_t* w, const Q8Block* xq, const KChunks& kc,
                       const float* bias, int64_t j0, int64_t j1, Out* out) {
  int64_t j = j0;
  for (; dots.weight_rows != nullptr && j + kDotWeightRows <= j1; j += kDotWeightRows) {
    prefetch_ahead(w, s.row_bytes, j, kDotWeightRows, j1);
    float acc[kDotWeightRows] = {};
    float part[kDotWeightRows];
    for (int64_t c0 = 0, c = 0; c0 < kc.nb; c0 += kc.chunk, ++c) {
      dots.weight_rows(w + j * s.row_bytes + c * kc.chunk_bytes, s.row_bytes, xq + c0, kc.values(c0), part);
      for (int r = 0; r < kDotWeightRows; ++r) acc[r] += part[r];
    }
    for (int r = 0; r < kDotWeightRows; ++r) {
      out[j + r] = static_cast<Out>(acc[r] + (bias != nullptr ? bias[j + r] : 0.0f));
    }
  }
  for (; j < j1; ++j) {
    prefetch_ahead(w, s.row_bytes, j, 1, j1);
    float acc = 0.0f;
    for (int64_t c0 = 0, c = 0; c0 < kc.nb; c0 += kc.chunk, ++c) {
      acc += dots.one(w + j * s.row_bytes + c * kc.chunk_bytes, xq + c0, kc.values(c0));
    }
    out[j] = static_cast<Out>(acc + (bias != nullptr ? bias[j] : 0.0f));
  }
}

// out[m, j] = dot(weight row j, x row m) (+ bias[j]) for the weight rows [j0, j1). The dots run
// over k in chunks of kXChunkBlocks, for kRowGroup weight rows at a time, so each x block is
// read from L1 by every row of the group.
template <typename Out>
void vec_dot_rows(const Shape& s, const Dots& dots, const uint8_t* w, const Q8Block* xq, int64_t rows, int64_t k,
                  const float* bias, int64_t j0, int64_t j1, Out* out) {
  const KChunks kc(*s.kernels, k);
  if (rows == 1) return vec_dot_one_x_row(s, dots, w, xq, kc, bias, j0, j1, out);
  std::vector<float> acc(static_cast<size_t>(kRowGroup * rows));  // [group row, m]
  std::vector<float> part(static_cast<size_t>(rows));              // [m]: one chunk's dots
  for (int64_t g0 = j0; g0 < j1; g0 += kRowGroup) {
    const int64_t g1 = std::min(j1, g0 + kRowGroup);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t c0 = 0, c = 0; c0 < kc.nb; c0 += kc.chunk, ++c) {
      for (int64_t j = g0; j < g1; ++j) {
        dots.run(w + j * s.row_bytes + c * kc.chunk_bytes, xq + c0, kc.nb, rows, kc.values(c0), part.data());
        float* a = acc.data() + (j - g0) * rows;
        for (int64_t m = 0; m < rows; ++m) a[m] += part[m];
      }
    }
    for (int64_t j = g0; j < g1; ++j) {
      const float b = bias != nullptr ? bias[j] : 0.0f;
      for (int64_t m = 0; m < rows; ++m) out[m * s.n + j] = static_cast<Out>(acc[(j - g0) * rows + m] + b);
    }
  }
}

template <typename Out>
void vec_dot_matmul(const Shape& s, const uint8_t* w, const Q8Block* xq, int64_t rows, int64_t k, const float* bias,
                    Out* out) {
  const Dots dots = dots_for(*s.kernels);
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (k * rows));
  at::parallel_for(0, s.n, grain, [&](int64_t j0, int64_t j1) {
    vec_dot_rows(s, dots, w, xq, rows, k, bias, j0, j1, out);
  });
}

// out [M, N] float32 = x [M, k] float32 @ dequant(w).T (+ bias), one weight tile at a time.
void tiled_gemm(const Shape& s, const uint8_t* w, const at::Tensor& x, int64_t k,
                const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t tile_rows = std::min(s.n, std::max(kMinTileRows, kTileValues / k));
  at::Tensor tile = at::empty({tile_rows, k}, x.options());  // [tile_rows, k] reused
  for (int64_t n0 = 0; n0 < s.n; n0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, s.n - n0);
    at::Tensor part = tile.narrow(0, 0, rows);
    dequantize_rows(*s.kernels, w + n0 * s.row_bytes, s.row_bytes, rows, k, part.data_ptr<float>());
    at::Tensor dst = out.narrow(1, n0, rows);  // [M, rows], row stride N
    if (bias.has_value()) {
      at::addmm_out(dst, bias->narrow(0, n0, rows), x, part.t());
    } else {
      at::mm_out(dst, x, part.t());
    }
  }
}

// ---- ops ----

at::Tensor block_matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k,
                        const std::optional<at::Tensor>& bias_in) {
  const Shape s = check_weight("block_matmul", w, qtype, k);
  check_activations(x_in, k);
  const std::optional<at::Tensor> bias = checked_bias(bias_in, s.n);
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = s.n;
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();  // [M, k]
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty(out_sizes, x.options());  // [..., N] in x's dtype
  if (rows == 0 || s.n == 0) return out;
  const uint8_t* wp = w.data_ptr<uint8_t>();

  if (rows < gemm_rows_threshold().load(std::memory_order_relaxed)) {
    const Q8Block* xq = quantize_activations(x, k);
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    if (x.scalar_type() == at::kFloat) {
      vec_dot_matmul(s, wp, xq, rows, k, bp, out.data_ptr<float>());
    } else {
      vec_dot_matmul(s, wp, xq, rows, k, bp, out.data_ptr<at::BFloat16>());
    }
    return out;
  }
  if (x.scalar_type() == at::kFloat) {
    at::Tensor out2d = out.view({rows, s.n});
    tiled_gemm(s, wp, x, k, bias, out2d);
    return out;
  }
  at::Tensor out_f = at::empty({rows, s.n}, x.options().dtype(at::kFloat));
  tiled_gemm(s, wp, x.to(at::kFloat), k, bias, out_f);
  out.view({rows, s.n}).copy_(out_f);
  return out;
}

at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t k) {
  const Shape s = check_weight("dequantize", w, qtype, k);
  at::Tensor out = at::empty({s.n, k}, w.options().dtype(at::kFloat));  // [N, k]
  if (s.n > 0) dequantize_rows(*s.kernels, w.data_ptr<uint8_t>(), s.row_bytes, s.n, k, out.data_ptr<float>());
  return out;
}

std::string isa() { return avx2_enabled().load() ? "avx2" : "scalar"; }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "auto" || name == "scalar", "set_isa: expected 'auto' or 'scalar', got '", name, "'");
  avx2_enabled().store(name == "auto" && cpu_has_avx2());
}

std::vector<int64_t> qtypes() {
  std::vector<int64_t> types;
  for (int i = 0; i < kLegacyKernelCount; ++i) types.push_back(kLegacyKernels[i].ggml_type);
  for (int i = 0; i < kKQuantKernelCount; ++i) types.push_back(kKQuantKernels[i].ggml_type);
  return types;
}

int64_t gemm_min_rows() { return gemm_rows_threshold().load(); }

void set_gemm_min_rows(int64_t rows) {
  TORCH_CHECK(rows >= 1, "set_gemm_min_rows: rows must be at least 1, got ", rows);
  gemm_rows_threshold().store(rows);
}

}  // namespace
}  // namespace ppinfer

TORCH_LIBRARY(ppinfer_kernels, m) {
  m.def("block_matmul(Tensor x, Tensor w, int qtype, int k, Tensor? bias=None) -> Tensor", &ppinfer::block_matmul);
  m.def("dequantize(Tensor w, int qtype, int k) -> Tensor", &ppinfer::dequantize);
  m.def("isa() -> str", &ppinfer::isa);
  m.def("set_isa(str isa) -> ()", &ppinfer::set_isa);
  m.def("qtypes() -> int[]", &ppinfer::qtypes);
  m.def("gemm_min_rows() -> int", &ppinfer::gemm_min_rows);
  m.def("set_gemm_min_rows(int rows) -> ()", &ppinfer::set_gemm_min_rows);
}
