// The input projection of a layer on the CPU, for every step and direction at once, and its
// backward:
//   linear(x [*, K], w [N, K], b [N]?) -> y [*, N] = x w^T + b
//   linear_backward(grad_y [*, N], x [*, K], w [N, K], output_mask [3])
//       -> (grad_x [*, K], grad_w [N, K], grad_b [N]); an output not asked for is empty ([0]).
// float32 on an AVX-512 CPU runs on packed_gemm: w packed once, rows of x split over threads.
// Other types and CPUs, and the weight gradient, use ATen (matmul.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "linear_cpu.h"
#include "matmul.h"
#include "packed_gemm.h"

namespace fastrnn_cpu {
namespace {

using at::Tensor;

// Rows of x per packed_gemm call: with one panel of packed weights they stay in the core's L2.
constexpr int64_t kRowsPerChunk = 64;

// out [M, N] = a [M, K] b + bias for b [K, N] = source(k, n) = source[k * stride_k + n * stride_n].
void packed_product(const Tensor& out, const Tensor& a, const float* source, int64_t stride_k,
                    int64_t stride_n, const float* bias) {
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1);
  PackedMatrix packed;
  packed.reset(K, N);
  at::parallel_for(0, packed.panels(), 1, [&](int64_t begin, int64_t end) {
    if (stride_k == 1) {  // columns of b contiguous: rows of a row-major weight
      packed.pack_panels_by_column([&](int64_t n) { return source + n * stride_n; }, begin, end);
    } else {
      packed.pack_panels(source, stride_k, stride_n, begin, end);
    }
  });
  const float* a_data = a.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  // Each thread takes an equal share of the tiles of 8 rows, in chunks of kRowsPerChunk rows.
  const int64_t row_tiles = (M + 7) / 8;
  at::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin * 8; first < std::min(end * 8, M); first += kRowsPerChunk) {
      const int64_t rows = std::min({kRowsPerChunk, end * 8 - first, M - first});
      packed_gemm(rows, a_data + first * K, K, packed, out_data + first * N, N, bias, false);
    }
  });
}

bool packed_float(const Tensor& a, const Tensor& b) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
         use_packed_gemm<float>() && a.numel() > 0 && b.numel() > 0;
}

}  // namespace

Tensor linear(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  const bool bias_float = !bias.has_value() || bias->scalar_type() == at::kFloat;
  if (!packed_float(input, weight) || !bias_float || input.dim() < 1 ||
      input.size(-1) != weight.size(1)) {
    return at::linear(input, weight, bias);
  }
  const int64_t K = weight.size(1), N = weight.size(0);
  const Tensor x = input.reshape({-1, K}).contiguous();  // [M, K]
  const Tensor w = weight.contiguous();                  // [N, K]
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == N, "fastrnn cpu linear: bias must have ", N,
              " entries, got ", b.numel());
  Tensor out = empty_large({x.size(0), N}, x.options());
  packed_product(out, x, w.data_ptr<float>(), 1, K, b.defined() ? b.data_ptr<float>() : nullptr);
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = N;
  return out.view(sizes);
}

Tensor linear_bf16(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && packed_gemm_bf16_supported(),
              "fastrnn cpu linear_bf16: needs bfloat16 input and AVX512_BF16");
  const int64_t K = weight.size(1), N = weight.size(0), K_even = (K + 1) / 2 * 2;
  Tensor x = input.reshape({-1, K});  // rows of even length, zero-padded: packed_gemm_bf16's a
  if (K_even != K || !x.is_contiguous()) {
    Tensor padded = at::zeros({x.size(0), K_even}, x.options());
    padded.narrow(1, 0, K).copy_(x);
    x = padded;
  }
  const Tensor w = weight.to(at::kFloat).contiguous();  // [N, K]
  const Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  PackedMatrixBf16 packed;
  packed.reset(K, N);
  at::parallel_for(0, packed.panels(), 1, [&](int64_t begin, int64_t end) {
    const float* source = w.data_ptr<float>();
    packed.pack_panels_by_column([&](int64_t n) { return source + n * K; }, begin, end);
  });
  const int64_t M = x.size(0);
  Tensor out = empty_large({M, N}, input.options().dtype(at::kFloat));
  const auto* a = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* out_data = out.data_ptr<float>();
  const float* bias_data = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t row_tiles = (M + 7) / 8;
  at::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin * 8; first < std::min(end * 8, M); first += kRowsPerChunk) {
      const int64_t rows = std::min({kRowsPerChunk, end * 8 - first, M - first});
      packed_gemm_bf16(rows, a + first * K_even, K_even, packed, out_data + first * N, N,
                       bias_data, false);
    }
  });
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = N;
  return out.view(sizes);
}

namespace {

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_output, const Tensor& input,
                                                   const Tensor& weight,
                                                   std::array<bool, 3> output_mask) {
  const int64_t K = weight.size(1), N = weight.size(0);
  const Tensor grad_y = grad_output.reshape({-1, N}).contiguous();  // [M, N]
  const Tensor x = input.reshape({-1, K}).contiguous();             // [M, K]
  const Tensor w = weight.contiguous();                             // [N, K]
  Tensor grad_x = at::empty({0}, x.options()), grad_w = at::empty({0}, x.options());
  Tensor grad_b = at::empty({0}, x.options());
  if (output_mask[0]) {
    if (packed_float(grad_y, w)) {
      grad_x = empty_large({x.size(0), K}, x.options());
      packed_product(grad_x, grad_y, w.data_ptr<float>(), K, 1, nullptr);
    } else {
      grad_x = at::mm(grad_y, w);
    }
    grad_x = grad_x.view(input.sizes());
  }
  if (output_mask[1]) {
    grad_w = at::empty({N, K}, x.options());
    matmul(grad_w, grad_y.t(), x, false);
  }
  if (output_mask[2]) grad_b = grad_y.sum(0);
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace fastrnn_cpu

TORCH_LIBRARY_FRAGMENT(fastrnn_cpu, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) {
  m.impl("linear", &fastrnn_cpu::linear);
  m.impl("linear_backward", &fastrnn_cpu::linear_backward);
}
