// A whole pre-norm decoder layer in one call (class ppinfer_kernels.DecoderLayer), for float32 CPU
// stages:
//
//   h = rms_norm(x, attn_norm); qkv = qkv_proj(h); [q, k] = qk_norm([q, k]) (optional)
//   a = out_proj(attend(q, k, v, ...)); a = post_attn_norm(a) (optional); a = a * residual_scale
//   x = x + a
//   m = mlp(rms_norm(x, ffn_norm)); m = post_ffn_norm(m) (optional); m = m * residual_scale
//   return x + m
//
// with mlp a gated feed-forward, down(glu(up(h))), or routed experts with an optional shared
// expert (MoeFeedForward's computation for softmax or sigmoid gating without expert groups).
// It calls the same functions, in the same order, as the layer's modules do one by one (the
// ppinfer ops of ops.h and ATen's), so its result is the same bits; what it saves is the host's
// cost between them: a decode step of a small model (SmolLM2: 30 layers of 576 values) spent more
// time in Python and the dispatcher than in its products.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
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

at::Tensor normed(const Norm& norm, const at::Tensor& x) {
  return norm.w.defined() ? ppinfer::rms_norm(x, norm.w, norm.eps) : x;
}

// torch.ops.mkldnn._linear_pointwise, the product of a weight prepacked for oneDNN (PackedLinear).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 std::optional<std::string>(std::string())};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// y = x @ W.T + bias for one stored weight: GGUF blocks row by row or packed 16 rows at a time,
// float32 (F.linear, or float_matmul's fixed chains: InvariantLinear), or float32 prepacked for
// oneDNN.
struct Part {
  enum class Kind { kBlocks, kPacked, kFloat, kInvariant, kOneDnn };
  Kind kind = Kind::kBlocks;
  at::Tensor w;
  int64_t qtype = 0, k = 0, n = 0;  // blocks only
  std::optional<at::Tensor> bias;   // [n] float32

  at::Tensor operator()(const at::Tensor& x) const {
    switch (kind) {
      case Kind::kBlocks:
        return block_matmul(x, w, qtype, k, bias);
      case Kind::kPacked:
        return packed_matmul(x, w, qtype, k, n, bias);
      case Kind::kFloat:
        return at::linear(x, w, bias);
      case Kind::kInvariant:
        return float_matmul(x, w, bias);
      case Kind::kOneDnn:
        return onednn_linear(x, w, bias);
    }
    TORCH_CHECK(false, "DecoderLayer: unknown weight kind");
  }
};

Part::Kind part_kind(const std::string& kind) {
  if (kind == "blocks") return Part::Kind::kBlocks;
  if (kind == "packed") return Part::Kind::kPacked;
  if (kind == "float") return Part::Kind::kFloat;
  if (kind == "invariant") return Part::Kind::kInvariant;
  TORCH_CHECK(kind == "onednn", "DecoderLayer: weight kind must be blocks, packed, float, invariant or onednn, got ",
              kind);
  return Part::Kind::kOneDnn;
}

// A projection: its parts' outputs side by side (one part, or several stored in different types,
// as a fused q, k, v whose v is Q6_K, or oneDNN's row blocks of a large float weight).
struct Projection {
  std::vector<Part> parts;

  bool empty() const { return parts.empty(); }
  at::Tensor operator()(const at::Tensor& x) const {
    if (parts.size() == 1) return parts[0](x);
    std::vector<at::Tensor> outs;
    for (const Part& part : parts) outs.push_back(part(x));
    return at::cat(outs, -1);
  }
};

// Every expert's weight as GGUF blocks [n_expert, ...]: x's rows grouped by expert, counts[e] each.
struct Experts {
  at::Tensor w;
  int64_t qtype = 0, k = 0, n = 0;
  bool packed = false;

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& counts) const {
    return packed ? packed_experts_matmul(x, w, qtype, k, n, counts) : experts_matmul(x, w, qtype, k, counts);
  }
};

// down(act(gate) * up), gate and up the halves of one [gate | up] projection.
struct GatedMlp {
  Projection up, down;
  int64_t glu_kind = 0;  // 0 SiLU, 1 tanh-approximated GELU

  at::Tensor operator()(const at::Tensor& x) const { return down(ppinfer::glu(up(x), glu_kind)); }
};

enum Gating : int64_t { kSoftmax = 0, kSigmoid = 1 };

// Routed SwiGLU experts, as MoeFeedForward computes them for softmax or sigmoid gating.
struct Moe {
  int64_t n_expert = 0, n_used = 0, gating = kSoftmax;
  bool normalize = false;  // chosen weights divided by their sum
  double weights_scale = 1.0;
  std::optional<at::Tensor> selection_bias;  // [n_expert] float32, added to the scores to choose only
  Projection router;
  Experts gate_up, down;
  std::optional<GatedMlp> shared;
  Projection shared_gate;  // [1, E] (or none): the shared expert's output scaled by sigmoid(x . gate)

  at::Tensor operator()(const at::Tensor& x) const {
    const at::Tensor flat = x.reshape({-1, x.size(-1)});  // [N, E]
    const at::Tensor probs = gating == kSoftmax ? router(flat).to(at::kFloat).softmax(-1)
                                                : ppinfer::sigmoid(router(flat).to(at::kFloat));  // [N, n_expert]
    const at::Tensor scores = selection_bias.has_value() ? probs + *selection_bias : probs;
    const at::Tensor chosen = std::get<1>(scores.topk(n_used, -1));  // [N, k]
    at::Tensor weights = probs.gather(1, chosen);                     // [N, k]
    if (normalize) weights = weights / weights.sum(-1, true);
    if (weights_scale != 1.0) weights = weights * weights_scale;
    // Token slots (token * k + j) grouped by expert: expert e's are the next counts[e] of `order`.
    const at::Tensor experts = chosen.flatten();                      // [N k]
    const at::Tensor order = experts.argsort(/*stable=*/true);        // [N k]
    const at::Tensor counts = at::bincount(experts, {}, n_expert);    // [n_expert]
    const at::Tensor tokens = at::floor_divide(order, n_used);        // [N k]
    const at::Tensor slot_weights = weights.flatten().index({order}).unsqueeze(1).to(x.scalar_type());  // [N k, 1]
    const at::Tensor y = down(ppinfer::glu(gate_up(flat.index({tokens}), counts), 0), counts) * slot_weights;
    at::Tensor out = at::zeros_like(flat).index_add_(0, tokens, y);  // [N, E]
    if (shared.has_value()) {
      at::Tensor s = (*shared)(flat);  // [N, E]
      if (!shared_gate.empty()) s = s * ppinfer::sigmoid(shared_gate(flat)).to(s.scalar_type());
      out = out + s;
    }
    return out.view_as(x);
  }
};

class DecoderLayer : public torch::CustomClassHolder {
 public:
  DecoderLayer(int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t n_rot, double scale, double softcap,
               double residual_scale)
      : n_head_(n_head), n_head_kv_(n_head_kv), head_dim_(head_dim), n_rot_(n_rot), scale_(scale), softcap_(softcap),
        residual_scale_(residual_scale) {
    TORCH_CHECK(n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0 && head_dim > 0, "DecoderLayer: ", n_head,
                " query heads, ", n_head_kv, " kv heads of ", head_dim);
  }

  // name: attn_norm, ffn_norm, qk_norm, post_attn_norm or post_ffn_norm.
  void set_norm(const std::string& name, const at::Tensor& w, double eps) { norm(name) = Norm{w, eps}; }

  // name: qkv, out, up ([gate | up]), down, router, shared_up, shared_down or shared_gate; kind:
  // blocks, packed, float, invariant or onednn (qtype, k and n for blocks only). Each call adds a
  // part, whose output follows the earlier parts'.
  void add_projection(const std::string& name, const std::string& kind, const at::Tensor& w, int64_t qtype, int64_t k,
                      int64_t n, const std::optional<at::Tensor>& bias) {
    projection(name).parts.push_back(Part{part_kind(kind), w, qtype, k, n, bias});
  }

  void set_sinks(const at::Tensor& sinks) { sinks_ = sinks; }

  // The feed-forward is the gated up and down projections.
  void set_gated_mlp(int64_t glu_kind) {
    TORCH_CHECK(glu_kind == 0 || glu_kind == 1, "DecoderLayer: glu kind ", glu_kind);
    mlp_.glu_kind = glu_kind;
    moe_.reset();
  }

  // The feed-forward is routed experts (set_experts, then add_projection: the router, and the
  // shared expert's up, down and gate where it has them); gating 0 softmax, 1 sigmoid.
  void set_moe(int64_t n_expert, int64_t n_used, int64_t gating, bool normalize, double weights_scale,
               const std::optional<at::Tensor>& selection_bias) {
    TORCH_CHECK(n_used > 0 && n_used <= n_expert && (gating == kSoftmax || gating == kSigmoid),
                "DecoderLayer: ", n_used, " of ", n_expert, " experts, gating ", gating);
    moe_ = Moe{n_expert, n_used, gating, normalize, weights_scale, selection_bias, Projection{}, {}, {}, {}, {}};
  }

  // name: gate_up ([n_expert, 2F, E] as [gate | up]) or down; set_moe first.
  void set_experts(const std::string& name, const at::Tensor& w, int64_t qtype, int64_t k, int64_t n, bool packed) {
    TORCH_CHECK(moe_.has_value() && (name == "gate_up" || name == "down"), "DecoderLayer: no experts named ", name);
    (name == "gate_up" ? moe_->gate_up : moe_->down) = Experts{w, qtype, k, n, packed};
  }

  // x [b, T, E] float32 -> [b, T, E]; this step's keys and values go into the pools as attend
  // writes them (rot, pools, table, cols and mask as attend takes them).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& rot, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& table, const at::Tensor& cols, const at::Tensor& mask) const {
    TORCH_CHECK(attn_norm_.w.defined() && ffn_norm_.w.defined() && !qkv_.empty() && !out_.empty(),
                "DecoderLayer: a norm or an attention projection was never set");
    TORCH_CHECK(moe_.has_value() ? !moe_->router.empty() && moe_->gate_up.w.defined() && moe_->down.w.defined()
                                 : !mlp_.up.empty() && !mlp_.down.empty(),
                "DecoderLayer: the feed-forward's projections or experts were never set");
    TORCH_CHECK(x.dim() == 3, "DecoderLayer: x must be [b, T, E], got ", x.sizes());
    const int64_t b = x.size(0), t = x.size(1), h = n_head_, hkv = n_head_kv_;
    const at::Tensor qkv = qkv_(ppinfer::rms_norm(x, attn_norm_.w, attn_norm_.eps))
                               .view({b, t, h + 2 * hkv, head_dim_});  // [b, T, H + 2 Hkv, D]
    const at::Tensor qk = normed(qk_norm_, qkv.narrow(2, 0, h + hkv));  // [b, T, H + Hkv, D]
    const at::Tensor v = qkv.narrow(2, h + hkv, hkv);                   // [b, T, Hkv, D]
    at::Tensor a = out_(attend(qk, v, rot, k_pool, v_pool, table, cols, mask, h, n_rot_, scale_, softcap_, sinks_));
    a = normed(post_attn_norm_, a);
    if (residual_scale_ != 1.0) a = a * residual_scale_;
    const at::Tensor y = x + a;  // [b, T, E]
    const at::Tensor h_ffn = ppinfer::rms_norm(y, ffn_norm_.w, ffn_norm_.eps);
    at::Tensor m = moe_.has_value() ? (*moe_)(h_ffn) : mlp_(h_ffn);
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
    if (name == "up") return mlp_.up;
    if (name == "down") return mlp_.down;
    TORCH_CHECK(name == "router" || name == "shared_up" || name == "shared_down" || name == "shared_gate",
                "DecoderLayer: no projection named ", name);
    TORCH_CHECK(moe_.has_value(), "DecoderLayer: set_moe before the projection ", name);
    if (name == "router") return moe_->router;
    if (name == "shared_gate") return moe_->shared_gate;
    if (!moe_->shared.has_value()) moe_->shared.emplace();
    return name == "shared_up" ? moe_->shared->up : moe_->shared->down;
  }

  int64_t n_head_, n_head_kv_, head_dim_, n_rot_;
  double scale_, softcap_;  // softcap 0: none
  double residual_scale_;
  Norm attn_norm_, ffn_norm_, qk_norm_, post_attn_norm_, post_ffn_norm_;
  Projection qkv_, out_;
  std::optional<at::Tensor> sinks_;  // [H] float32
  GatedMlp mlp_;
  std::optional<Moe> moe_;  // set: the feed-forward is these experts, not mlp_
};

}  // namespace
}  // namespace ppinfer

TORCH_LIBRARY_FRAGMENT(ppinfer_kernels, m) {
  m.class_<ppinfer::DecoderLayer>("DecoderLayer")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double, double>())
      .def("set_norm", &ppinfer::DecoderLayer::set_norm)
      .def("add_projection", &ppinfer::DecoderLayer::add_projection)
      .def("set_sinks", &ppinfer::DecoderLayer::set_sinks)
      .def("set_gated_mlp", &ppinfer::DecoderLayer::set_gated_mlp)
      .def("set_moe", &ppinfer::DecoderLayer::set_moe)
      .def("set_experts", &ppinfer::DecoderLayer::set_experts)
      .def("forward", &ppinfer::DecoderLayer::forward);
}
