// A whole pre-norm decoder layer in one call (class ppinfer_kernels.DecoderLayer), for float32 CPU
// stages whose projections stay GGUF blocks:
//
//   h = rms_norm(x, attn_norm); qkv = qkv_proj(h); [q, k] = qk_norm([q, k]) (optional)
//   a = out_proj(attend(q, k, v, ...)); a = post_attn_norm(a) (optional); a = a * residual_scale
//   x = x + a
//   m = down_proj(glu(up_proj(rms_norm(x, ffn_norm)))); m = post_ffn_norm(m) (optional);
//   m = m * residual_scale
//   return x + m
//
// It calls the same functions, in the same order, as the torch ops a layer's modules call one by
// one (ops.h), so its result is the same bits; what it saves is the host's cost between them: a
// decode step of a small model (SmolLM2: 30 layers of 576 values) spends more time in Python
// and the dispatcher than in its products.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ops.h"

namespace ppinfer {
namespace {

struct Norm {
  at::Tensor w;  // [D] or per head [P, D]; undefined: no such norm
  double eps = 0.0;
};

// y = x @ W.T + bias, W as GGUF blocks row by row (block_matmul) or packed 16 rows at a time.
struct Part {
  at::Tensor w;
  int64_t qtype = 0, k = 0, n = 0;
  bool packed = false;
  std::optional<at::Tensor> bias;  // [n] float32

  at::Tensor operator()(const at::Tensor& x) const {
    return packed ? packed_matmul(x, w, qtype, k, n, bias) : block_matmul(x, w, qtype, k, bias);
  }
};

// A projection's parts' outputs side by side: one part, or several stored in different types
// (a fused q, k, v whose v is Q6_K, say).
struct Projection {
  std::vector<Part> parts;

  at::Tensor operator()(const at::Tensor& x) const {
    if (parts.size() == 1) return parts[0](x);
    std::vector<at::Tensor> outs;
    for (const Part& part : parts) outs.push_back(part(x));
    return at::cat(outs, -1);
  }
};

at::Tensor normed(const Norm& norm, const at::Tensor& x) {
  return norm.w.defined() ? ppinfer::rms_norm(x, norm.w, norm.eps) : x;
}

class DecoderLayer : public torch::CustomClassHolder {
 public:
  DecoderLayer(int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t n_rot, double scale, double softcap,
               int64_t glu_kind, double residual_scale)
      : n_head_(n_head), n_head_kv_(n_head_kv), head_dim_(head_dim), n_rot_(n_rot), scale_(scale), softcap_(softcap),
        glu_kind_(glu_kind), residual_scale_(residual_scale) {
    TORCH_CHECK(n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0 && head_dim > 0, "DecoderLayer: ", n_head,
                " query heads, ", n_head_kv, " kv heads of ", head_dim);
  }

  // name: attn_norm, ffn_norm, qk_norm, post_attn_norm or post_ffn_norm.
  void set_norm(const std::string& name, const at::Tensor& w, double eps) { norm(name) = Norm{w, eps}; }

  // name: qkv, out, up ([gate | up]) or down; each call adds a part, whose output follows the
  // earlier parts'.
  void add_projection(const std::string& name, const at::Tensor& w, int64_t qtype, int64_t k, int64_t n, bool packed,
                      const std::optional<at::Tensor>& bias) {
    projection(name).parts.push_back(Part{w, qtype, k, n, packed, bias});
  }

  void set_sinks(const at::Tensor& sinks) { sinks_ = sinks; }

  // x [b, T, E] float32 -> [b, T, E]; this step's keys and values go into the pools as attend
  // writes them (rot, pools, table, cols and mask as attend takes them).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& rot, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& table, const at::Tensor& cols, const at::Tensor& mask) const {
    TORCH_CHECK(attn_norm_.w.defined() && ffn_norm_.w.defined() && !qkv_.parts.empty() && !out_.parts.empty() &&
                    !up_.parts.empty() && !down_.parts.empty(),
                "DecoderLayer: a norm or projection was never set");
    TORCH_CHECK(x.dim() == 3, "DecoderLayer: x must be [b, T, E], got ", x.sizes());
    const int64_t b = x.size(0), t = x.size(1), h = n_head_, hkv = n_head_kv_;
    const at::Tensor h_in = ppinfer::rms_norm(x, attn_norm_.w, attn_norm_.eps);  // [b, T, E]
    const at::Tensor qkv = qkv_(h_in).view({b, t, h + 2 * hkv, head_dim_});       // [b, T, H + 2 Hkv, D]
    const at::Tensor qk = normed(qk_norm_, qkv.narrow(2, 0, h + hkv));  // [b, T, H + Hkv, D]
    const at::Tensor v = qkv.narrow(2, h + hkv, hkv);                   // [b, T, Hkv, D]
    at::Tensor a = out_(attend(qk, v, rot, k_pool, v_pool, table, cols, mask, h, n_rot_, scale_, softcap_, sinks_));
    a = normed(post_attn_norm_, a);
    if (residual_scale_ != 1.0) a = a * residual_scale_;
    const at::Tensor y = x + a;  // [b, T, E]
    at::Tensor m = down_(ppinfer::glu(up_(ppinfer::rms_norm(y, ffn_norm_.w, ffn_norm_.eps)), glu_kind_));
    m = normed(post_ffn_norm_, m);
    if (residual_scale_ != 1.0) m = m * residual_scale_;
    return y + m;
  }

 private:
  Norm& norm(const std::string& name) {
    if (name == "attn_norm") return attn_norm_;
    if (name == "ffn_norm") return ffn_norm_;
    if (name == "qk_norm") return qk_norm_;
    if (name == "post_attn_norm") return post_attn_norm_;
    TORCH_CHECK(name == "post_ffn_norm", "DecoderLayer: no norm named ", name);
    return post_ffn_norm_;
  }

  Projection& projection(const std::string& name) {
    if (name == "qkv") return qkv_;
    if (name == "out") return out_;
    if (name == "up") return up_;
    TORCH_CHECK(name == "down", "DecoderLayer: no projection named ", name);
    return down_;
  }

  int64_t n_head_, n_head_kv_, head_dim_, n_rot_;
  double scale_, softcap_;  // softcap 0: none
  int64_t glu_kind_;        // 0 SiLU, 1 tanh-approximated GELU
  double residual_scale_;
  Norm attn_norm_, ffn_norm_, qk_norm_, post_attn_norm_, post_ffn_norm_;
  Projection qkv_, out_, up_, down_;
  std::optional<at::Tensor> sinks_;  // [H] float32
};

}  // namespace
}  // namespace ppinfer

TORCH_LIBRARY_FRAGMENT(ppinfer_kernels, m) {
  m.class_<ppinfer::DecoderLayer>("DecoderLayer")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double, int64_t, double>())
      .def("set_norm", &ppinfer::DecoderLayer::set_norm)
      .def("add_projection", &ppinfer::DecoderLayer::add_projection)
      .def("set_sinks", &ppinfer::DecoderLayer::set_sinks)
      .def("forward", &ppinfer::DecoderLayer::forward);
}
