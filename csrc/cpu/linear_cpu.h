// The input projection of a layer on the CPU (linear_cpu.cpp), for the recurrence to share.

#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastrnn_cpu {

// y [*, N] = x [*, K] w [N, K]^T + b [N]; float32 on AVX-512 CPUs on packed_gemm, else ATen.
at::Tensor linear(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// The same for a bfloat16 x, in float32: bfloat16 products (w rounded to bfloat16) summed in
// float32 and kept so (packed_gemm_bf16); only where packed_gemm_bf16_supported().
at::Tensor linear_bf16(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);

}  // namespace fastrnn_cpu
