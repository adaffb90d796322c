// The C++ entry points of the ops that other ops compose (block.cpp): the same functions the
// torch ops of the same names call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace ppinfer {

// ops.cpp
at::Tensor block_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t k,
                        const std::optional<at::Tensor>& bias);
at::Tensor experts_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t k, const at::Tensor& counts);
// packed.cpp
at::Tensor packed_matmul(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t k, int64_t n,
                         const std::optional<at::Tensor>& bias);
at::Tensor packed_experts_matmul(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t k, int64_t n,
                                 const at::Tensor& counts);
// floats.cpp
at::Tensor float_matmul(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
// fused.cpp
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& w, double eps);
at::Tensor glu(const at::Tensor& h, int64_t kind);
at::Tensor sigmoid(const at::Tensor& x);
at::Tensor attend(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rot, const at::Tensor& k_pool,
                  const at::Tensor& v_pool, const at::Tensor& table, const at::Tensor& cols, const at::Tensor& mask,
                  int64_t n_head, int64_t n_rot, double scale, double softcap, const std::optional<at::Tensor>& sinks);

}  // namespace ppinfer
