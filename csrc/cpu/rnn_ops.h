// The ops of the fused CPU kernels (registered in rnn_cpu.cpp), following the contract of
// fastrnn/backends/base.py. Legend as in rnn_cpu.cpp.

#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace fastrnn_cpu {

using at::Tensor;

// One layer forward from its input projection x_gates [T, B, D*G*H] (layer_forward.cpp):
// (output, h_n, c_n, workspace).
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    std::string_view cell, const Tensor& x_gates, const Tensor& h0, const std::optional<Tensor>& c0,
    const Tensor& w_hh, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace);

// One layer forward from its input x [T, B, I] (layer_forward.cpp).
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward_from_input(
    std::string_view cell, const Tensor& x, const Tensor& w_ih, const std::optional<Tensor>& b_ih,
    const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace);

// One layer forward with dynamically quantized int8 products, for inference
// (layer_forward_int8.cpp): x [T, B, I], h0 [D, B, P] and c0 [D, B, H] float32; per direction,
// weights in torch's order, each weight as its int8 rows packed per gate in panels (int8_gemm.h;
// fastrnn/quantized.py makes them) with the rows' float32 scales and int32 sums: w_ih [G*H, I],
// its scales, its sums, w_hh [G*H, P], its scales, its sums, [b_ih, b_hh] (float32),
// [w_hr [P, H], its scales, its sums] -> (output [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or
// empty).
std::tuple<Tensor, Tensor, Tensor> layer_forward_int8(std::string_view cell, const Tensor& x,
                                                      const Tensor& h0,
                                                      const std::optional<Tensor>& c0,
                                                      at::TensorList weights, bool has_biases,
                                                      const std::optional<Tensor>& lengths);

// One layer backward (layer_backward.cpp): (grad_x_gates, grad_h0, grad_c0, grad_w_hh,
// grad_b_hh, grad_w_hr).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    std::string_view cell, const std::optional<Tensor>& grad_output,
    const std::optional<Tensor>& grad_h_n, const std::optional<Tensor>& grad_c_n, const Tensor& h0,
    const std::optional<Tensor>& c0, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, const Tensor& output, const Tensor& workspace);

// One step of a cell, x [B, I], h [B, H], c [B, H] (step.cpp): (h', c', workspace).
std::tuple<Tensor, Tensor, Tensor> cell_step_forward(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, bool keep_workspace);

// A one-layer, one-direction call of one step that needs no gradient, as one op (step.cpp):
// input [1, B, I] ([B, 1, I] batch_first), h0 and c0 (LSTM) [1, B, H] or none (zeros) ->
// [output [1, B, H] ([B, 1, H]), h_n [1, B, H], c_n [1, B, H] (LSTM only)], as a layer gives
// them (the output a tensor of its own).
std::vector<Tensor> layer_step(std::string_view cell, const Tensor& input,
                               const std::optional<Tensor>& h0, const std::optional<Tensor>& c0,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh, bool batch_first);

// Its backward (step.cpp): the gradients of x, h, c, w_ih, w_hh, b_ih, b_hh (those asked for).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_step_backward(
    std::string_view cell, const std::optional<Tensor>& grad_h_new,
    const std::optional<Tensor>& grad_c_new, const Tensor& x, const Tensor& h,
    const std::optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh, const Tensor& h_new,
    const Tensor& workspace, std::array<bool, 7> output_mask);

// The two as one op (step_autograd.cpp): cell_step runs the forward, cell_step_autograd (its
// Autograd kernel) differentiates it with a native node.
std::tuple<Tensor, Tensor, Tensor> cell_step(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh);
std::tuple<Tensor, Tensor, Tensor> cell_step_autograd(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh);

}  // namespace fastrnn_cpu
