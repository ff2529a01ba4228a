// One layer backward (rnn_cpu.cpp's overview): BPTT over the saved gates, the time loop split by
// rows or by blocks of columns, then one GEMM per weight over all steps.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cell_pass.h"
#include "layer_plan.h"
#include "matmul.h"
#include "packed_gemm.h"
#include "parallel_steps.h"
#include "rnn_ops.h"

namespace fastrnn_cpu {
namespace {

template <typename T>
void backward_impl(const CellInfo& info, const Tensor& grad_output, const Tensor& grad_h_n,
                   const Tensor& grad_c_n, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                   const Tensor& w_hr, const int64_t* lengths, bool bf16_products,
                   const Tensor& output, const Tensor& workspace, Tensor& grad_x_gates,
                   Tensor& grad_h0, Tensor& grad_c0, Tensor& grad_w_hh, Tensor& grad_b_hh,
                   Tensor& grad_w_hr) {
  const int64_t T_ = output.size(0), B = output.size(1);
  const int64_t D = w_hh.size(0), GH = w_hh.size(1), P = w_hh.size(2), H = GH / info.gates;
  const int64_t W = info.workspace_gates * H;
  const bool lstm = info.cell == Cell::kLstm, gru = info.cell == Cell::kGru;
  const bool projects = w_hr.defined();
  auto options = output.options();
  // The steps split over threads by blocks of columns of h (a barrier per phase) or by groups
  // of batch rows (packed GEMMs only, as in the forward).
  const int64_t columns_by_columns = units_per_block(P);
  const int64_t groups = projects || !use_packed_gemm<T>()
      ? 1 : row_groups(B, (P + columns_by_columns - 1) / columns_by_columns);
  const int64_t block_columns = groups > 1 ? P : columns_by_columns;
  const int64_t column_blocks = (P + block_columns - 1) / block_columns;
  // bfloat16 products (a bfloat16 layer on a CPU with them) for grad h_prev and the weight
  // gradient, grad_gates rounded to bfloat16 for them as oneDNN does; else float32.
  const bool bf16 = std::is_same_v<T, float> && bf16_products;
  const int64_t GH_even = (GH + 1) / 2 * 2;
  Tensor grad_h_gates_all = gru ? empty_large({T_, B, GH}, options) : Tensor();  // [T, B, G*H]
  Tensor grad_step_all = projects ? empty_large({T_, B, P}, options) : Tensor();
  Tensor h_unprojected_all = projects ? empty_large({T_, B, H}, options) : Tensor();
  Tensor grad_unprojected = projects ? at::empty({B, H}, options) : Tensor();
  for (int64_t d = 0; d < D; ++d) {
    const bool reverse = d == 1;
    // The running gradient of h [B, P] before step s (in processing order): grad_h0[d] at even s,
    // grad_h_other at odd s.
    Tensor grad_h_other = at::empty({B, P}, options);
    const Tensor grad_h_buffers[2] = {grad_h0[d], grad_h_other};
    if (grad_h_n.defined()) grad_h0[d].copy_(grad_h_n[d]); else grad_h0[d].zero_();
    Tensor grad_c = lstm ? grad_c0[d] : Tensor();
    if (lstm) {
      if (grad_c_n.defined()) grad_c.copy_(grad_c_n[d]); else grad_c.zero_();
    }
    Tensor weight = w_hh[d];  // [G*H, P]
    // Per block of columns: its columns of W_hh, contiguous, and its part of grad h_prev W_hh.
    std::vector<Tensor> weight_block(column_blocks), grad_h_block(column_blocks);
    std::vector<PackedMatrix> weight_packed(use_packed_gemm<T>() && !bf16 ? column_blocks : 0);
    std::vector<PackedMatrixBf16> weight_bf16(bf16 ? column_blocks : 0);
    std::vector<std::vector<uint16_t>> grad_gates_bf16(bf16 ? column_blocks : 0);  // [B, GH_even]
    const Tensor weight_t = bf16 ? weight.t().contiguous() : Tensor();  // [P, G*H]
    if constexpr (std::is_same_v<T, float>) {
      const auto reset_block = [&](int64_t k) {  // room for block k's columns of W_hh, packed
        const int64_t columns = std::min(block_columns, P - k * block_columns);
        if (bf16) {
          weight_bf16[k].reset(GH, columns);
          grad_gates_bf16[k].assign(B * GH_even, 0);
        } else if (!weight_packed.empty()) {
          weight_packed[k].reset(GH, columns);
        }
      };
      const auto pack_block = [&](int64_t k, int64_t p0, int64_t p1) {  // its panels [p0, p1)
        const int64_t first = k * block_columns;
        if (bf16) {
          const float* rows = weight_t.data_ptr<float>() + first * GH;
          weight_bf16[k].pack_panels_by_column([&](int64_t n) { return rows + n * GH; }, p0, p1);
        } else if (!weight_packed.empty()) {
          weight_packed[k].pack_panels(weight.data_ptr<float>() + first, P, 1, p0, p1);
        }
      };
      const auto panels_of = [&](int64_t k) {
        const int64_t columns = std::min(block_columns, P - k * block_columns);
        return (columns + PackedMatrix::kPanelColumns - 1) / PackedMatrix::kPanelColumns;
      };
      pack_blocks(column_blocks, groups > 1, reset_block, pack_block, panels_of);
    }
    const bool use_matmul = weight_packed.empty() && weight_bf16.empty();
    for (int64_t k = 0; use_matmul && column_blocks > 1 && k < column_blocks; ++k) {
      const int64_t first = k * block_columns, columns = std::min(block_columns, P - first);
      weight_block[k] = weight.narrow(1, first, columns).contiguous();
      grad_h_block[k] = at::empty({B, columns}, options);
    }
    Tensor grad_x_d = grad_x_gates.narrow(2, d * GH, GH);  // [T, B, G*H]
    Tensor grad_h_gates_d = gru ? grad_h_gates_all : grad_x_d;
    Tensor output_d = output.narrow(2, d * P, P);  // [T, B, P]
    BackwardStep<T> base{};  // the fields that stay across steps
    base.hidden = H;
    base.out_size = P;
    base.seq_len = T_;
    base.reverse = reverse;
    base.lengths = lengths;
    base.grad_output_row = D * P;
    base.workspace = workspace.data_ptr<T>() + d * W;
    base.workspace_row = D * W;
    base.workspace_step = B * D * W;
    base.c_initial = lstm ? c0[d].data_ptr<T>() : nullptr;
    base.output = output_d.data_ptr<T>();
    base.output_row = D * P;
    base.output_step = B * D * P;
    base.h_initial = h0[d].data_ptr<T>();
    base.grad_x_gates_row = D * GH;
    base.grad_c = lstm ? grad_c.data_ptr<T>() : nullptr;
    base.grad_h_row = P;
    const T* grad_output_d = grad_output.defined() ? grad_output.data_ptr<T>() + d * P : nullptr;
    const auto time_of = [&](int64_t s) { return reverse ? s : T_ - 1 - s; };
    // The cell pass of step s, grad h being the running gradient plus grad_output.
    const auto step_at = [&](int64_t s) {
      BackwardStep<T> step = base;
      step.t = time_of(s);
      step.grad_h_carry = grad_h_buffers[s % 2].data_ptr<T>();
      step.grad_h_next = grad_h_buffers[(s + 1) % 2].data_ptr<T>();
      step.grad_x_gates = grad_x_d.data_ptr<T>() + step.t * B * D * GH;
      step.grad_h_gates = gru ? grad_h_gates_all.data_ptr<T>() + step.t * B * GH : nullptr;
      step.grad_h = step.grad_h_carry;
      step.grad_output = grad_output_d == nullptr ? nullptr : grad_output_d + step.t * B * D * P;
      return step;
    };
    // grad h_prev of step s += grad_h_gates W_hh, over the columns of block k and the rows
    // [r0, r1) (the matmul path: all rows).
    const auto add_recurrent_gradient = [&](int64_t s, int64_t k, int64_t r0, int64_t r1) {
      const Tensor& grad_h_next = grad_h_buffers[(s + 1) % 2];
      const int64_t first = k * block_columns, columns = std::min(block_columns, P - first);
      if constexpr (std::is_same_v<T, float>) {  // no tensor made: may run in a persistent region
        const int64_t row = grad_h_gates_d.stride(1);
        const float* grad_gates = grad_h_gates_d.data_ptr<float>() +
                                  time_of(s) * grad_h_gates_d.stride(0) + r0 * row;
        float* grad_h = grad_h_next.data_ptr<float>() + r0 * P + first;
        if (bf16) {
          uint16_t* grad_gates_k = grad_gates_bf16[k].data() + r0 * GH_even;
          to_bfloat16_rows(grad_gates, r1 - r0, GH, row, grad_gates_k, GH_even);
          packed_gemm_bf16(r1 - r0, grad_gates_k, GH_even, weight_bf16[k], grad_h, P, nullptr,
                           true);
          return;
        }
        if (!weight_packed.empty()) {
          packed_gemm(r1 - r0, grad_gates, row, weight_packed[k], grad_h, P, nullptr, true);
          return;
        }
      }
      const Tensor grad_h_gates_t = grad_h_gates_d[time_of(s)];  // [B, G*H]
      if (column_blocks == 1) {
        matmul(grad_h_next, grad_h_gates_t, weight, true);
        return;
      }
      matmul(grad_h_block[k], grad_h_gates_t, weight_block[k], false);
      const T* __restrict src = grad_h_block[k].data_ptr<T>();
      T* __restrict dst = grad_h_next.data_ptr<T>() + first;
      for (int64_t b = 0; b < B; ++b) {
        #pragma GCC ivdep
        for (int64_t j = 0; j < columns; ++j) dst[b * P + j] += src[b * columns + j];
      }
    };
    const auto add_recurrent_gradients = [&](int64_t s) {
      parallel_for(0, column_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) add_recurrent_gradient(s, k, 0, B);
      });
    };
    if (projects) {  // grad of the projected h, then through W_hr to the unprojected h
      for (int64_t s = 0; s < T_; ++s) {
        BackwardStep<T> step = step_at(s);
        const int64_t t = step.t;
        T* grad_step = grad_step_all.data_ptr<T>() + t * B * P;
        for (int64_t b = 0; b < B; ++b) {
          const bool valid = lengths == nullptr || t < lengths[b];
          for (int64_t k = 0; k < P; ++k) {
            grad_step[b * P + k] = step.grad_h_carry[b * P + k] +
                (valid && step.grad_output != nullptr ? step.grad_output[b * D * P + k] : T(0));
          }
        }
        at::mm_out(grad_unprojected, grad_step_all[t], w_hr[d]);
        step.grad_h = grad_unprojected.data_ptr<T>();
        step.grad_h_row = H;
        step.grad_output = nullptr;
        step.h_unprojected = h_unprojected_all.data_ptr<T>() + t * B * H;
        cell_pass(info.cell, step, B, H);
        add_recurrent_gradients(s);
      }
    } else if (groups > 1) {  // each thread runs its rows through every step: no barrier
      for_each_row_group(B, groups, [&](int64_t r0, int64_t r1) {
        for (int64_t s = 0; s < T_; ++s) {
          const BackwardStep<T> step = step_at(s);
          for (int64_t b = r0; b < r1; ++b) run_segment(info.cell, step, b, 0, H);
          add_recurrent_gradient(s, 0, r0, r1);
        }
      });
    } else if (column_blocks == 1) {  // one block: the cell passes split over threads by rows
      for (int64_t s = 0; s < T_; ++s) {
        cell_pass(info.cell, step_at(s), B, H);
        add_recurrent_gradients(s);
      }
    } else {
      // Phase 2s: the cell pass of step s, rows shared out over the threads in proportion to
      // their blocks; phase 2s + 1: its recurrent gradient, by blocks of columns.
      const auto run_phase = [&](int64_t phase, int64_t begin, int64_t end) {
        const int64_t s = phase / 2;
        if (phase % 2 == 1) {
          for (int64_t k = begin; k < end; ++k) add_recurrent_gradient(s, k, 0, B);
          return;
        }
        const BackwardStep<T> step = step_at(s);
        for (int64_t b = begin * B / column_blocks; b < end * B / column_blocks; ++b) {
          run_segment(info.cell, step, b, 0, H);
        }
      };
      parallel_steps(2 * T_, column_blocks, !use_matmul, [](int64_t, int64_t, int64_t) {},
                     run_phase);
    }
    if (T_ % 2 == 1) grad_h0[d].copy_(grad_h_other);  // grad h0 is in grad_h_buffers[T % 2]

    // Weight gradients over all steps, one GEMM each. h_prev of each step is the neighbouring
    // output, or h0 at each sequence's first processed step.
    Tensor h_prev = empty_large({T_, B, P}, options);  // [T, B, P]
    if (!reverse) {
      h_prev[0].copy_(h0[d]);
      if (T_ > 1) h_prev.narrow(0, 1, T_ - 1).copy_(output_d.narrow(0, 0, T_ - 1));
    } else {
      if (T_ > 1) h_prev.narrow(0, 0, T_ - 1).copy_(output_d.narrow(0, 1, T_ - 1));
      h_prev[T_ - 1].copy_(h0[d]);
      for (int64_t b = 0; lengths != nullptr && b < B; ++b) {
        if (lengths[b] < T_) h_prev[lengths[b] - 1][b].copy_(h0[d][b]);
      }
    }
    Tensor grad_w_hh_d = grad_w_hh[d];
    if (bf16) {  // on oneDNN's bfloat16 GEMM; the result is rounded to bfloat16 when returned
      grad_w_hh_d.copy_(at::mm(grad_h_gates_d.flatten(0, 1).t().to(at::kBFloat16),
                               h_prev.flatten(0, 1).to(at::kBFloat16)));
    } else {
      matmul(grad_w_hh_d, grad_h_gates_d.flatten(0, 1).t(), h_prev.flatten(0, 1), false);
    }
    if (gru) {  // b_hn enters through r * (W_hn h + b_hn): the sum of the h gates' gradients
      Tensor grad_b_hh_d = grad_b_hh[d];
      at::sum_out(grad_b_hh_d, grad_h_gates_d.flatten(0, 1), at::IntArrayRef{0});
    }
    if (projects) {
      Tensor grad_w_hr_d = grad_w_hr[d];
      at::mm_out(grad_w_hr_d, grad_step_all.flatten(0, 1).t(), h_unprojected_all.flatten(0, 1));
    }
  }
  if (!gru) {  // grad b_hh = grad b_ih: the very sum linear_backward takes, to the bit
    grad_b_hh.view({D * GH}).copy_(grad_x_gates.reshape({-1, D * GH}).sum(0));
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    std::string_view cell, const std::optional<Tensor>& grad_output,
    const std::optional<Tensor>& grad_h_n, const std::optional<Tensor>& grad_c_n, const Tensor& h0,
    const std::optional<Tensor>& c0, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, const Tensor& output, const Tensor& workspace) {
  const CellInfo info = cell_info(cell);
  const auto dtype = output.scalar_type();
  const auto compute = compute_type(dtype);
  TORCH_CHECK(compute == at::kFloat || compute == at::kDouble,
              "fastrnn cpu: unsupported dtype ", dtype);
  TORCH_CHECK(workspace.scalar_type() == compute, "fastrnn cpu: workspace must be ", compute);
  const int64_t T_ = output.size(0), B = output.size(1);
  const int64_t D = w_hh.size(0), GH = w_hh.size(1), P = w_hh.size(2), H = GH / info.gates;
  const Tensor valid_steps = checked_lengths(lengths, T_, B);
  const bool lstm = info.cell == Cell::kLstm;
  auto options = output.options().dtype(compute);
  Tensor grad_x_gates = empty_large({T_, B, D * GH}, options);
  Tensor grad_h0 = at::empty({D, B, P}, options);
  Tensor grad_c0 = lstm ? at::empty({D, B, H}, options) : at::empty({0}, options);
  Tensor grad_w_hh = at::empty({D, GH, P}, options);
  Tensor grad_b_hh = at::empty({D, GH}, options);
  Tensor grad_w_hr = w_hr.has_value() ? at::empty({D, P, H}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(compute, "fastrnn_cpu_layer_backward", [&] {
    backward_impl<scalar_t>(
        info, to_compute(value_or_undefined(grad_output), compute),
        to_compute(value_or_undefined(grad_h_n), compute),
        lstm ? to_compute(value_or_undefined(grad_c_n), compute) : Tensor(),
        to_compute(h0, compute), to_compute(value_or_undefined(c0), compute),
        to_compute(w_hh, compute), to_compute(value_or_undefined(w_hr), compute),
        lengths_data(valid_steps), dtype == at::kBFloat16 && packed_gemm_bf16_supported(),
        to_compute(output, compute), workspace.contiguous(), grad_x_gates, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr);
  });
  if (compute != dtype) {
    return {grad_x_gates.to(dtype), grad_h0.to(dtype), grad_c0.to(dtype), grad_w_hh.to(dtype),
            grad_b_hh.to(dtype), grad_w_hr.to(dtype)};
  }
  return {grad_x_gates, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr};
}

}  // namespace fastrnn_cpu
