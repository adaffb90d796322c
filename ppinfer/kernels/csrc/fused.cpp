// Fused float32 CPU ops for a decoder layer's small steps (namespace ppinfer_kernels), so that
// a decode step costs a few op calls per layer instead of dozens of tiny torch ops:
//
// rms_norm(x [..., D], w, eps): x * (1 / sqrt(mean(x^2) + eps)) * w, the sum of squares in
//   double as llama.cpp takes it (and the scale too, so that no square overflows); w is [D],
//   or [P, D] for per-head weights over x's last two dims [..., P, D].
// attend(qk, v, rot, k_pool, v_pool, table, cols, mask, n_head, n_rot, scale, softcap, sinks): rotary
//   embedding of q and k (none where n_rot is 0), the new keys and values written into a paged
//   cache (blocks of [Hkv, BS, D] keys and [Hkv, BS, Dv] values, float32, float16 or bfloat16,
//   or [Hkv, BS, D / 32 * 34] bytes of Q8_0 blocks: each batch row's slot s lives in block
//   table[row, s / BS] at offset s % BS) at the slots `cols`, and grouped-query
//   attention over each row's slots [0, n) under `mask`, with an optional tanh softcap on the
//   scores and an optional sink logit per query head that joins each softmax and takes its share
//   of the weight to nowhere (gpt-oss); returns [b, T, H * Dv] float32, the layout the output
//   projection takes.
// glu(h [..., 2F], kind): act(gate) * up for the fused [gate | up] projection, act SiLU
//   (kind 0) or tanh-approximated GELU (kind 1); returns [..., F].
//
// Portable C++ (the compiler vectorizes the eight-lane partial sums), so they run on any CPU;
// attention's dots and sums use AVX2 and FMA where the block kernels do (`set_isa`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "qtypes.h"

#if defined(__GNUC__) || defined(__clang__)
#define PPINFER_ALWAYS_INLINE inline __attribute__((always_inline))
#define PPINFER_PREFETCH(p) __builtin_prefetch(p)
#else
#define PPINFER_ALWAYS_INLINE inline
#define PPINFER_PREFETCH(p) ((void)(p))
#endif

namespace ppinfer {
namespace {

// Work (multiply-adds) below which a range of rows or heads is not split between threads.
constexpr int64_t kGrainMacs = int64_t{1} << 14;

// 32 cached values x[i] ~= d * q[i], GGUF's Q8_0 block (the float16 scale, then the 32 int8
// values): a slot of a Q8_0 cache is D / 32 of them, a quarter of float32's bytes plus the scales.
struct KvQ8 {
  uint16_t d;  // IEEE half
  int8_t q[kQ8Elems];
};
static_assert(sizeof(KvQ8) == 34, "a Q8_0 block is 34 bytes");

// One key's or value's d floats rounded into a cache slot of type T.
template <class T>
inline void store(const float* x, T* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(x[i]);
}
// Q8_0 as GGUF quantizes it: d = max |x| / 127 over each 32 values, q = round(x / d) (halves away
// from zero), d stored as float16.
template <>
inline void store(const float* x, KvQ8* dst, int64_t d) {
  for (int64_t b = 0; b < d / kQ8Elems; ++b) {
    const float* xb = x + b * kQ8Elems;
    float amax = 0.0f;
    for (int i = 0; i < kQ8Elems; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.0f;
    const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int i = 0; i < kQ8Elems; ++i) dst[b].q[i] = static_cast<int8_t>(std::round(xb[i] * inv));
    dst[b].d = c10::Half(scale).x;
  }
}

// y = x with pairs (x[2i], x[2i+1]) of the first n_rot values rotated by (cos, sin) = rot[i].
inline void rotate(const float* x, const float* rot, int64_t n_rot, int64_t d, float* y) {
  for (int64_t i = 0; i < n_rot / 2; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
    y[2 * i] = a * c - b * s;
    y[2 * i + 1] = a * s + b * c;
  }
  for (int64_t i = n_rot; i < d; ++i) y[i] = x[i];
}

void check_float_cpu(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(t.stride(dim - 1) == 1, op, ": ", name, "'s last dim must be contiguous");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const std::optional<at::Tensor>& w_in, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 1,
              "rms_norm: x must be a float32 CPU tensor, got ", x_in.scalar_type(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.size(-1);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  at::Tensor w;
  int64_t w_rows = 1;
  if (w_in.has_value()) {
    w = w_in->contiguous();
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.size(-1) == d && w.dim() <= 2,
                "rms_norm: w must be float32 [", d, "] or [P, ", d, "], got ", w.scalar_type(), " ", w.sizes());
    w_rows = w.numel() / std::max<int64_t>(d, 1);
    TORCH_CHECK(w.dim() == 1 || (x.dim() >= 2 && x.size(-2) == w_rows), "rms_norm: per-head w ", w.sizes(),
                " does not match x ", x.sizes());
  }
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * d;
      double sum = 0.0;
      for (int64_t i = 0; i < d; ++i) sum += static_cast<double>(xr[i]) * xr[i];
      const float scale = static_cast<float>(1.0 / std::sqrt(sum / d + eps));
      float* yr = op + r * d;
      if (wp == nullptr) {
        for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * scale;
      } else {
        const float* wr = wp + (r % w_rows) * d;
        for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * scale) * wr[i];
      }
    }
  });
  return out;
}

at::Tensor glu(const at::Tensor& h_in, int64_t kind) {
  TORCH_CHECK(h_in.device().is_cpu() && h_in.scalar_type() == at::kFloat && h_in.dim() >= 1 && h_in.size(-1) % 2 == 0,
              "glu: h must be a float32 CPU tensor [..., 2F], got ", h_in.scalar_type(), " ", h_in.sizes());
  TORCH_CHECK(kind == 0 || kind == 1, "glu: kind must be 0 (SiLU) or 1 (GELU, tanh), got ", kind);
  const at::Tensor h = h_in.contiguous();
  const int64_t f = h.size(-1) / 2;
  const int64_t rows = f == 0 ? 0 : h.numel() / (2 * f);
  std::vector<int64_t> sizes(h.sizes().begin(), h.sizes().end());
  sizes.back() = f;
  at::Tensor out = at::empty(sizes, h.options());  // [..., F]
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2 / pi), GELU's cubic term
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(f, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gate = hp + r * 2 * f;
      const float* up = gate + f;
      float* y = op + r * f;
      if (kind == 0) {
        for (int64_t i = 0; i < f; ++i) y[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      } else {
        for (int64_t i = 0; i < f; ++i) {
          const float x = gate[i];
          y[i] = 0.5f * x * (1.0f + std::tanh(k0 * (x + k1 * x * x * x))) * up[i];
        }
      }
    }
  });
  return out;
}

// 1 / (1 + exp(-x)) element by element in plain scalar code: an element's result does not depend
// on where it sits in x. (torch's sigmoid rounds differently in its vector body and its scalar
// tail, so a row of router scores would depend on how many rows share the tensor.)
at::Tensor sigmoid(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "sigmoid: x must be a float32 CPU tensor, got ", x_in.scalar_type(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrainMacs, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) op[i] = 1.0f / (1.0f + std::exp(-xp[i]));
  });
  return out;
}

namespace {

// Slots ahead of the one in use whose key (first pass) or value (second pass) is prefetched, a
// 64-byte line at a time: the cache of a decode step mostly comes from memory (measured on 8
// rows of SmolLM2: 140-150 us a layer against about 200 without; 4 and 16 slots ahead did no
// better). A prefetch never faults, past the end of the cache included.
constexpr int64_t kAhead = 8;
// Keys whose values the heads of a group take turns on (32 float32 heads of 64: 8 KiB, in L1).
constexpr int64_t kValueChunk = 32;

// One query token's attention for the `group` query heads that read one kv head. Slot s's key
// is at keys + blocks[s / bs] * block_stride + (s % bs) * row, its value at values + blocks[s /
// bs] * v_block_stride + (s % bs) * v_row, in units of T: a row is d (dv) for a float cache,
// d / 32 (dv / 32) for Q8_0 blocks.
template <class T>
struct GroupTask {
  const float* q;          // [group, d] rotated queries
  const T* keys;           // the pools' first blocks, at this kv head
  const T* values;
  const int64_t* blocks;   // [ceil(n / bs)] the row's block ids
  int64_t bs, block_stride, row, v_block_stride, v_row;
  const bool* visible;     // [n]
  int64_t n, d, dv, group; // dv: a value's width (deepseek2's are narrower than its keys)
  float scale, cap;        // cap 0: no softcap
  const float* sinks;      // [group]: each query head's sink logit, or null (none)
  float* scratch;          // [group * (n + 8)]: scores, then each head's max and sum
  const T** listed;        // [2 * (n + 8)]: the visible slots' keys and values (attend_listed_avx2)
  bool ahead;              // prefetch the next keys and values (a decode step's cache comes from memory)
  float* out;              // [group, dv]

  const T* key(int64_t s) const { return keys + blocks[s / bs] * block_stride + (s % bs) * row; }
  const T* value(int64_t s) const { return values + blocks[s / bs] * v_block_stride + (s % bs) * v_row; }
  // A slot's key (`width` row) or value (v_row) into the cache, a 64-byte line at a time.
  void prefetch(const T* slot, int64_t width) const {
    const char* p = reinterpret_cast<const char*>(slot);
    for (int64_t x = 0; x < width * static_cast<int64_t>(sizeof(T)); x += 64) PPINFER_PREFETCH(p + x);
  }
};

// The portable dots and sums (the compiler vectorizes the eight independent partial sums); the
// cache's elements are widened to float32 as they are read.
struct ScalarVec {
  // sum a[i] * b[i]
  template <class T>
  static float dot(const float* a, const T* b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * static_cast<float>(b[i + l]);
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
    return s;
  }
  // y += p * x
  template <class T>
  static void axpy(float p, const T* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += p * static_cast<float>(x[i]);
  }
  // Q8_0: each block's integer-valued dot in float, times its scale.
  static float dot(const float* a, const KvQ8* b, int64_t n) {
    float s = 0.0f;
    for (int64_t k = 0; k < n / kQ8Elems; ++k) {
      const float* ak = a + k * kQ8Elems;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int i = 0; i < kQ8Elems; i += 8) {
        for (int l = 0; l < 8; ++l) acc[l] += ak[i + l] * static_cast<float>(b[k].q[i + l]);
      }
      const float blk = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      s += blk * fp16_to_fp32(b[k].d);
    }
    return s;
  }
  static void axpy(float p, const KvQ8* x, float* y, int64_t n) {
    for (int64_t k = 0; k < n / kQ8Elems; ++k) {
      const float pd = p * fp16_to_fp32(x[k].d);
      for (int i = 0; i < kQ8Elems; ++i) y[k * kQ8Elems + i] += pd * static_cast<float>(x[k].q[i]);
    }
  }
};

// Scores of every visible slot for every head (keys read once for the group), softmax, then
// the values' weighted sum (values read once).
template <class Vec, class T>
PPINFER_ALWAYS_INLINE void attend_group(const GroupTask<T>& a) {
  float* scores = a.scratch;  // [group, n]
  float* best = scores + a.group * a.n;
  float* total = best + a.group;
  const float none = -std::numeric_limits<float>::infinity();
  std::fill(best, best + a.group, none);
  for (int64_t s = 0; s < a.n; ++s) {
    if (!a.visible[s]) continue;
    const T* k = a.key(s);
    if (s + kAhead < a.n) a.prefetch(a.key(s + kAhead), a.row);
    for (int64_t e = 0; e < a.group; ++e) {
      float score = Vec::dot(a.q + e * a.d, k, a.d) * a.scale;
      if (a.cap > 0) score = std::tanh(score / a.cap) * a.cap;
      scores[e * a.n + s] = score;
      best[e] = std::max(best[e], score);
    }
  }
  std::fill(a.out, a.out + a.group * a.dv, 0.0f);
  if (best[0] == none) return;  // no visible key (never for a real query: it sees its own slot)
  for (int64_t e = 0; a.sinks != nullptr && e < a.group; ++e) best[e] = std::max(best[e], a.sinks[e]);
  std::fill(total, total + a.group, 0.0f);
  for (int64_t s = 0; s < a.n; ++s) {
    if (!a.visible[s]) continue;
    const T* v = a.value(s);
    if (s + kAhead < a.n) a.prefetch(a.value(s + kAhead), a.v_row);
    for (int64_t e = 0; e < a.group; ++e) {
      const float p = std::exp(scores[e * a.n + s] - best[e]);
      total[e] += p;
      Vec::axpy(p, v, a.out + e * a.dv, a.dv);
    }
  }
  for (int64_t e = 0; a.sinks != nullptr && e < a.group; ++e) total[e] += std::exp(a.sinks[e] - best[e]);
  for (int64_t e = 0; e < a.group; ++e) {
    const float inv = 1.0f / total[e];
    for (int64_t x = 0; x < a.dv; ++x) a.out[e * a.dv + x] *= inv;
  }
}

template <class T>
void attend_group_scalar(const GroupTask<T>& a) { attend_group<ScalarVec>(a); }

#ifdef PPINFER_X86
// Eight cache elements widened to float32.
PPINFER_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PPINFER_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PPINFER_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

struct Avx2Vec {
  template <class T>
  PPINFER_AVX2 static inline float dot(const float* a, const T* b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float s = _mm_cvtss_f32(s4);
    for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
    return s;
  }
  template <class T>
  PPINFER_AVX2 static inline void axpy(float p, const T* x, float* y, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, load8(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += p * static_cast<float>(x[i]);
  }
  // Q8_0: per block, four eight-lane products of the widened int8 values, then one fma with the
  // block's scale.
  PPINFER_AVX2 static inline float dot(const float* a, const KvQ8* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n / kQ8Elems; ++k) {
      const float* ak = a + k * kQ8Elems;
      __m256 blk = _mm256_mul_ps(_mm256_loadu_ps(ak), widen8(b[k].q));
      blk = _mm256_fmadd_ps(_mm256_loadu_ps(ak + 8), widen8(b[k].q + 8), blk);
      blk = _mm256_fmadd_ps(_mm256_loadu_ps(ak + 16), widen8(b[k].q + 16), blk);
      blk = _mm256_fmadd_ps(_mm256_loadu_ps(ak + 24), widen8(b[k].q + 24), blk);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(b[k].d)), blk, acc);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    return _mm_cvtss_f32(s4);
  }
  PPINFER_AVX2 static inline void axpy(float p, const KvQ8* x, float* y, int64_t n) {
    for (int64_t k = 0; k < n / kQ8Elems; ++k) {
      const __m256 pd = _mm256_set1_ps(p * _cvtsh_ss(x[k].d));
      float* yk = y + k * kQ8Elems;
      for (int i = 0; i < kQ8Elems; i += 8) {
        _mm256_storeu_ps(yk + i, _mm256_fmadd_ps(pd, widen8(x[k].q + i), _mm256_loadu_ps(yk + i)));
      }
    }
  }

 private:
  // Eight int8 values to float32.
  PPINFER_AVX2 static inline __m256 widen8(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
  }
};

// exp(x) in eight lanes for x <= 0 (softmax weights): x = k ln2 + r with |r| <= ln2 / 2, e^r from
// Cephes' degree-7 polynomial in r, times 2^k put into the exponent; 0 below -87.3 (where float
// runs out of normal numbers), -inf included. Within 2 ulp of exp over that range.
PPINFER_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-87.33654475f);
  const __m256 under = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i k_int = _mm256_cvtps_epi32(k);
  const __m256 two_k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k_int, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, two_k));
}

// The eight sums of eight accumulators, each over the tree ((a0 + a4) + (a2 + a6)) + ((a1 + a5) +
// (a3 + a7)) of its lanes, in lane order [0, 2, 4, 6, 1, 3, 5, 7]: every sum is the same bits
// whichever accumulators share the call, so a query's scores do not depend on its neighbours.
PPINFER_AVX2 inline __m256 hsum8x8(const __m256* a) {
  __m256 t[4];  // t[p] = [a_2p lanes l + l+4 (l < 4), a_2p+1 likewise]
  for (int p = 0; p < 4; ++p) {
    t[p] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * p], a[2 * p + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * p], a[2 * p + 1], 0x31));
  }
  __m256 u[2];  // lanes l + l+2 (l < 2) of t: u[0] = [a0 a0 a2 a2 | a1 a1 a3 a3], u[1] for a4-a7
  for (int p = 0; p < 2; ++p) {
    u[p] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// One query's attention over a float32, float16 or bfloat16 cache, the same arithmetic for a
// decode step and for every token of a prefill: the visible slots are listed in order first, so
// each sum runs over the visible keys' ordinals, never over slot numbers that padding or a
// group's width would shift. Scores: a dot per key in eight lanes then hsum8x8, eight keys at a
// time; weights: exp8 over the list; the normaliser: eight lanes by ordinal then the same tree;
// the values: each output lane summed in key order, in registers.
template <class T>
PPINFER_AVX2 void attend_listed_avx2(const GroupTask<T>& a) {
  const int64_t d = a.d, dv = a.dv;
  const T** keys = a.listed;  // the visible slots' keys and values, in slot order
  const T** values = a.listed + a.n + 8;
  int64_t m = 0;
  for (int64_t first = 0, block = 0; first < a.n; first += a.bs, ++block) {  // a block's slots at a time
    const int64_t at = a.blocks[block] * a.block_stride, v_at = a.blocks[block] * a.v_block_stride;
    const int64_t last = std::min(a.n, first + a.bs);
    for (int64_t s = first; s < last; ++s) {
      if (!a.visible[s]) continue;
      keys[m] = a.keys + at + (s - first) * a.row;
      values[m++] = a.values + v_at + (s - first) * a.v_row;
    }
  }
  const int64_t m8 = (m + 7) / 8 * 8;
  std::fill(a.out, a.out + a.group * dv, 0.0f);
  if (m == 0) return;  // no visible key (never for a real query: it sees its own slot)
  for (int64_t o = m; o < m8; ++o) keys[o] = keys[m - 1];  // lanes past the list, discarded
  float* scores = a.scratch;  // [group, m8]
  // hsum8x8 returns accumulators 0, 2, 4, 6, 1, 3, 5, 7: accumulator k takes key o + kKey[k], so
  // that the eight sums come out in key order.
  constexpr int kKey[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int64_t o = 0; o < m8; o += 8) {
    for (int64_t x = o + 8; a.ahead && x < std::min(o + 16, m); ++x) {
      a.prefetch(keys[x], a.row);
      a.prefetch(values[x], a.v_row);
    }
    for (int64_t e = 0; e < a.group; ++e) {
      const float* q = a.q + e * d;
      float* out = scores + e * m8 + o;
      __m256 acc[8];
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, load8(keys[o + kKey[k]] + i), acc[k]);
      }
      _mm256_storeu_ps(out, hsum8x8(acc));
      for (int k = 0; k < 8 && i < d; ++k) {  // heads of a size not a multiple of 8
        for (int64_t j = i; j < d; ++j) out[k] += q[j] * static_cast<float>(keys[o + k][j]);
      }
    }
  }
  float* inv = scores + a.group * m8;  // [group]: 1 / each head's normaliser
  const float none = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < a.group; ++e) {
    float* p = scores + e * m8;
    std::fill(p + m, p + m8, none);
    if (a.cap > 0) {
      for (int64_t o = 0; o < m; ++o) p[o] = std::tanh(p[o] * a.scale / a.cap) * a.cap;
    }
    const __m256 scale = _mm256_set1_ps(a.cap > 0 ? 1.0f : a.scale);
    __m256 top = _mm256_set1_ps(none);
    for (int64_t o = 0; o < m8; o += 8) {
      const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(p + o), scale);
      _mm256_storeu_ps(p + o, s);
      top = _mm256_max_ps(top, s);
    }
    top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 1));  // the max is exact in any order
    top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, _MM_SHUFFLE(1, 0, 3, 2)));
    top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, _MM_SHUFFLE(2, 3, 0, 1)));
    if (a.sinks != nullptr) top = _mm256_max_ps(top, _mm256_set1_ps(a.sinks[e]));
    __m256 total = _mm256_setzero_ps();
    for (int64_t o = 0; o < m8; o += 8) {
      const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + o), top));
      _mm256_storeu_ps(p + o, w);
      total = _mm256_add_ps(total, w);
    }
    __m256 lanes[8] = {total, total, total, total, total, total, total, total};  // lane 0: total's tree
    float sum = _mm256_cvtss_f32(hsum8x8(lanes));
    if (a.sinks != nullptr) sum += _mm256_cvtss_f32(exp8(_mm256_sub_ps(_mm256_set1_ps(a.sinks[e]), top)));
    inv[e] = 1.0f / sum;
  }
  // The values' weighted sums, kValueChunk keys at a time so that every head of the group reads
  // them from L1; each output lane still adds its terms in key order.
  for (int64_t first = 0; first < m; first += kValueChunk) {
    const int64_t last = std::min(m, first + kValueChunk);
    for (int64_t e = 0; e < a.group; ++e) {
      const float* p = scores + e * m8;
      float* out = a.out + e * dv;
      int64_t x0 = 0;
      for (; x0 + 64 <= dv; x0 += 64) {  // 64 output lanes at a time in eight registers
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(out + x0 + 8 * j);
        for (int64_t o = first; o < last; ++o) {
          const __m256 w = _mm256_set1_ps(p[o]);
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w, load8(values[o] + x0 + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + x0 + 8 * j, acc[j]);
      }
      for (; x0 + 8 <= dv; x0 += 8) {
        __m256 acc = _mm256_loadu_ps(out + x0);
        for (int64_t o = first; o < last; ++o) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[o]), load8(values[o] + x0), acc);
        _mm256_storeu_ps(out + x0, acc);
      }
      for (; x0 < dv; ++x0) {
        for (int64_t o = first; o < last; ++o) out[x0] += p[o] * static_cast<float>(values[o][x0]);
      }
    }
  }
  for (int64_t e = 0; e < a.group; ++e) {
    for (int64_t x = 0; x < dv; ++x) a.out[e * dv + x] *= inv[e];
  }
}

// Q8_0 caches keep the slot-order pass (their dots go block by block).
template <class T>
PPINFER_AVX2 void attend_group_avx2(const GroupTask<T>& a) {
  if constexpr (std::is_same_v<T, KvQ8>) {
    attend_group<Avx2Vec>(a);
  } else {
    attend_listed_avx2(a);
  }
}
#else
template <class T>
void attend_group_avx2(const GroupTask<T>& a) { attend_group<ScalarVec>(a); }
#endif

// T is the cache's element (float, c10::Half, c10::BFloat16) or KvQ8 for Q8_0 blocks; the pools'
// strides are in their own elements (bytes for Q8_0) and become units of T here.
template <class T>
void attend_typed(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rot, const at::Tensor& k_pool,
                  const at::Tensor& v_pool, const at::Tensor& table, const at::Tensor& cols, const at::Tensor& mask,
                  int64_t n_head, int64_t n_rot, double scale, double softcap, const float* sinks, at::Tensor& out) {
  const int64_t b = qk.size(0), t = qk.size(1), d = qk.size(3), dv = v.size(3), h = n_head;
  const int64_t hkv = k_pool.size(1), bs = k_pool.size(2), nb = table.size(1), n = mask.size(3);
  const int64_t unit = static_cast<int64_t>(sizeof(T)) / k_pool.element_size();  // pool elements per T
  const int64_t row = k_pool.size(3) / unit, head_stride = k_pool.stride(1) / unit;
  const int64_t block_stride = k_pool.stride(0) / unit;
  const int64_t v_row = v_pool.size(3) / unit, v_head_stride = v_pool.stride(1) / unit;
  const int64_t v_block_stride = v_pool.stride(0) / unit;
  const float* rp = rot.data_ptr<float>();
  const float* qkp = qk.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  T* kc = reinterpret_cast<T*>(k_pool.data_ptr());
  T* vc = reinterpret_cast<T*>(v_pool.data_ptr());
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  const auto at_qk = [&](int64_t i, int64_t j, int64_t head) {
    return qkp + i * qk.stride(0) + j * qk.stride(1) + head * qk.stride(2);
  };
  const auto key_slot = [&](int64_t i, int64_t g, int64_t s) {
    return kc + tp[i * nb + s / bs] * block_stride + g * head_stride + (s % bs) * row;
  };
  const auto value_slot = [&](int64_t i, int64_t g, int64_t s) {
    return vc + tp[i * nb + s / bs] * v_block_stride + g * v_head_stride + (s % bs) * v_row;
  };

  // The new tokens' keys (rotated) and values into their slots, rounded to the cache's type.
  std::vector<float> rotated(d);
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < t; ++j) {
      const float* r = rp + (i * t + j) * n_rot;
      const int64_t s = cp[i * t + j];
      for (int64_t g = 0; g < hkv; ++g) {
        rotate(at_qk(i, j, h + g), r, n_rot, d, rotated.data());
        store(rotated.data(), key_slot(i, g, s), d);
        store(vp + i * v.stride(0) + j * v.stride(1) + g * v.stride(2), value_slot(i, g, s), dv);
      }
    }
  }

  float* outp = out.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const int64_t group = h / hkv;
  const float scalef = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const auto run_group = avx2_active() ? attend_group_avx2<T> : attend_group_scalar<T>;
  // One task per (row, query token, kv head): the group of query heads reading that kv head, or,
  // where there are fewer of those than threads (a one-row decode step of gemma-3-270m, whose
  // one kv head serves 4 query heads), each group in as many parts as threads (each reads the
  // keys and values again, which costs more than it saves while every thread has a group).
  // Each head's sums are its own, so the split changes no bit.
  const int64_t groups = b * t * hkv, threads = at::get_num_threads();
  const int64_t splits = groups < threads ? std::min(group, threads) : 1;
  const int64_t per = (group + splits - 1) / splits;  // query heads a task (the last may have fewer)
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, 2 * n * d * per));
  at::parallel_for(0, groups * splits, grain, [&](int64_t task0, int64_t task1) {
    std::vector<float> q(per * d), scratch(per * (n + 8));
    std::vector<const T*> listed(2 * (n + 8));
    for (int64_t task = task0; task < task1; ++task) {
      // Queries taken first, last, second, second to last, ...: under a causal mask a query's
      // cost grows with its position, so any run of tasks a thread takes is a fair share.
      const int64_t i = task / (t * hkv * splits), u = task / (hkv * splits) % t, g = task / splits % hkv;
      const int64_t j = u % 2 == 0 ? u / 2 : t - 1 - u / 2;
      const int64_t first = task % splits * per, heads = std::min(group, first + per) - first;
      const int64_t head0 = g * group + first;  // the task's first query head
      for (int64_t e = 0; e < heads; ++e) {
        rotate(at_qk(i, j, head0 + e), rp + (i * t + j) * n_rot, n_rot, d, q.data() + e * d);
      }
      const GroupTask<T> work{q.data(), kc + g * head_stride, vc + g * v_head_stride, tp + i * nb, bs, block_stride,
                              row, v_block_stride, v_row, mp + (i * t + j) * n, n, d, dv, heads, scalef, cap,
                              sinks != nullptr ? sinks + head0 : nullptr, scratch.data(),
                              listed.data(), t == 1, outp + ((i * t + j) * h + head0) * dv};
      run_group(work);
    }
  });
}

}  // namespace

at::Tensor attend(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rot_in, const at::Tensor& k_pool,
                  const at::Tensor& v_pool, const at::Tensor& table_in, const at::Tensor& cols_in,
                  const at::Tensor& mask_in, int64_t n_head, int64_t n_rot, double scale, double softcap,
                  const std::optional<at::Tensor>& sinks_in) {
  constexpr const char* op = "attend";
  check_float_cpu(op, "qk", qk, 4);  // [b, T, H + Hkv, D]
  check_float_cpu(op, "v", v, 4);  // [b, T, Hkv, Dv]
  const at::ScalarType kv = k_pool.scalar_type();
  TORCH_CHECK(k_pool.device().is_cpu() && k_pool.dim() == 4 && k_pool.is_contiguous() &&
                  (kv == at::kFloat || kv == at::kHalf || kv == at::kBFloat16 || kv == at::kByte),
              op, ": k_pool must be a contiguous float32, float16 or bfloat16 CPU tensor [N, Hkv, BS, D] or uint8 ",
              "Q8_0 blocks [N, Hkv, BS, D / 32 * 34], got ", kv, " ", k_pool.sizes());
  const int64_t b = qk.size(0), t = qk.size(1), d = qk.size(3), dv = v.size(3);
  const int64_t hkv = k_pool.size(1), bs = k_pool.size(2), h = n_head;
  TORCH_CHECK(h > 0 && hkv > 0 && h % hkv == 0 && qk.size(2) == h + hkv, op, ": qk ", qk.sizes(), " for ", h,
              " query heads and a cache of ", hkv, " kv heads");
  const int64_t row = kv == at::kByte ? d / kQ8Elems * static_cast<int64_t>(sizeof(KvQ8)) : d;
  TORCH_CHECK((kv != at::kByte || d % kQ8Elems == 0) && k_pool.size(3) == row, op, ": pool ", k_pool.sizes(),
              " does not match qk ", qk.sizes(), kv == at::kByte ? " (Q8_0: head size a multiple of 32)" : "");
  TORCH_CHECK(v.size(0) == b && v.size(1) == t && v.size(2) == hkv && dv > 0, op, ": v ", v.sizes(),
              " does not match qk ", qk.sizes());
  const int64_t v_row = kv == at::kByte ? dv / kQ8Elems * static_cast<int64_t>(sizeof(KvQ8)) : dv;
  TORCH_CHECK(v_pool.scalar_type() == kv && v_pool.is_contiguous() && v_pool.dim() == 4 &&
                  v_pool.size(0) == k_pool.size(0) && v_pool.size(1) == hkv && v_pool.size(2) == bs &&
                  v_pool.size(3) == v_row && (kv != at::kByte || dv % kQ8Elems == 0),
              op, ": v_pool ", v_pool.scalar_type(), " ", v_pool.sizes(), " does not match k_pool ", k_pool.sizes(),
              " and v ", v.sizes());
  const at::Tensor table = table_in.contiguous();  // [b, nb] int64: each row's block ids
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == b, op,
              ": table must be int64 [", b, ", nb], got ", table.scalar_type(), " ", table.sizes());
  const int64_t nb = table.size(1);
  TORCH_CHECK(n_rot >= 0 && n_rot <= d && n_rot % 2 == 0, op, ": n_rot ", n_rot, " for head dim ", d);
  const at::Tensor rot = rot_in.contiguous();  // [b, T, n_rot/2, 2] (cos, sin)
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.numel() == b * t * n_rot, op, ": rot must be float32 [b, T, ",
              n_rot / 2, ", 2], got ", rot.scalar_type(), " ", rot.sizes());
  const at::Tensor cols = cols_in.contiguous();  // [b, T] int64
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.sizes() == at::IntArrayRef({b, t}), op, ": cols must be int64 [",
              b, ", ", t, "], got ", cols.scalar_type(), " ", cols.sizes());
  const at::Tensor mask = mask_in.contiguous();  // [b, 1, T, n] bool
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == b && mask.size(1) == 1 &&
                  mask.size(2) == t && mask.size(3) <= nb * bs,
              op, ": mask must be bool [", b, ", 1, ", t, ", n <= ", nb * bs, "], got ", mask.scalar_type(), " ",
              mask.sizes());
  const int64_t n = mask.size(3);
  const int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * t; ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] < nb * bs, op, ": slot ", cp[i], " outside a table of ", nb, " blocks of ", bs);
  }
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t used = (n + bs - 1) / bs;  // blocks each row reads
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t k = 0; k < nb; ++k) {
      const bool needed = k < used || k == cp[i * t] / bs || k == cp[i * t + t - 1] / bs;
      TORCH_CHECK(!needed || (tp[i * nb + k] >= 0 && tp[i * nb + k] < k_pool.size(0)), op, ": block ",
                  tp[i * nb + k], " of row ", i, " outside a pool of ", k_pool.size(0));
    }
  }

  at::Tensor sinks;  // [H] float32
  if (sinks_in.has_value()) {
    sinks = sinks_in->contiguous();
    TORCH_CHECK(sinks.device().is_cpu() && sinks.scalar_type() == at::kFloat && sinks.dim() == 1 && sinks.size(0) == h,
                op, ": sinks must be float32 [", h, "] on the CPU, got ", sinks.scalar_type(), " ", sinks.sizes());
  }
  const float* sp = sinks.defined() ? sinks.data_ptr<float>() : nullptr;

  at::Tensor out = at::empty({b, t, h * dv}, qk.options());  // [b, T, H * Dv]
  if (kv == at::kFloat) {
    attend_typed<float>(qk, v, rot, k_pool, v_pool, table, cols, mask, n_head, n_rot, scale, softcap, sp, out);
  } else if (kv == at::kHalf) {
    attend_typed<c10::Half>(qk, v, rot, k_pool, v_pool, table, cols, mask, n_head, n_rot, scale, softcap, sp, out);
  } else if (kv == at::kBFloat16) {
    attend_typed<c10::BFloat16>(qk, v, rot, k_pool, v_pool, table, cols, mask, n_head, n_rot, scale, softcap, sp, out);
  } else {
    attend_typed<KvQ8>(qk, v, rot, k_pool, v_pool, table, cols, mask, n_head, n_rot, scale, softcap, sp, out);
  }
  return out;
}

}  // namespace ppinfer

TORCH_LIBRARY_FRAGMENT(ppinfer_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor? w, float eps) -> Tensor", &ppinfer::rms_norm);
  m.def("glu(Tensor h, int kind) -> Tensor", &ppinfer::glu);
  m.def("sigmoid(Tensor x) -> Tensor", &ppinfer::sigmoid);
  m.def(
      "attend(Tensor qk, Tensor v, Tensor rot, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor table, Tensor cols, "
      "Tensor mask, int n_head, int n_rot, float scale, float softcap, Tensor? sinks=None) -> Tensor",
      &ppinfer::attend);
}
