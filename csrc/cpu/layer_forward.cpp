// One layer forward (rnn_cpu.cpp's overview): the time loop over blocks of hidden units or groups
// of batch rows, their per-step products and cell passes.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cell_pass.h"
#include "layer_plan.h"
#include "linear_cpu.h"
#include "matmul.h"
#include "packed_gemm.h"
#include "parallel_steps.h"
#include "rnn_ops.h"

namespace fastrnn_cpu {
namespace {

// The input projection of a layer run step by step inside the recurrence (packed GEMMs): x_gates
// of step t are x[t] W_ih^T + b_ih in float32, computed per block of units, never stored whole.
struct InputProjection {
  Tensor x;     // [T, B, I] float32 with unit stride along I; bfloat16: rows of even length,
                //   zero-padded past I (the a operand of packed_gemm_bf16)
  Tensor w_ih;  // [D*G*H, I] float32, contiguous
  Tensor b_ih;  // [D*G*H] float32, contiguous, or undefined
  bool bf16;    // x is bfloat16: bfloat16 products (AVX512_BF16), summed in float32
};

template <typename T>
void forward_impl(const CellInfo& info, const Tensor& x_gates, const InputProjection* projection,
                  const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const Tensor& b_hh,
                  const Tensor& w_hr, const int64_t* lengths, bool bf16_products,
                  Tensor& output, Tensor& h_n, Tensor& c_n, Tensor& workspace) {
  const int64_t T_ = output.size(0), B = output.size(1);
  const int64_t D = w_hh.size(0), GH = w_hh.size(1), P = w_hh.size(2), G = info.gates;
  const int64_t H = GH / G, W = info.workspace_gates * H;
  const bool lstm = info.cell == Cell::kLstm;
  const bool projects = w_hr.defined();
  const bool save_gates = workspace.numel() > 0;  // for a backward: [T, B, D, W], else empty
  // The steps split over threads by blocks of hidden units (a barrier per step) or by groups of
  // batch rows (packed GEMMs only). With a projection the whole step is one block: the
  // projection needs every unit's h.
  const int64_t units_by_units = projects ? H : units_per_block(H);
  const int64_t groups = projects || !use_packed_gemm<T>()
      ? 1 : row_groups(B, (H + units_by_units - 1) / units_by_units);
  const int64_t block_units = groups > 1 ? H : units_by_units;
  const int64_t blocks = (H + block_units - 1) / block_units;
  Tensor zero_bias = b_hh.defined() ? Tensor() : at::zeros({GH}, output.options());
  Tensor h_unprojected = projects ? at::empty({B, H}, output.options()) : Tensor();
  Tensor h_other = at::empty({B, P}, output.options());
  std::vector<Tensor> h_gates(blocks), w_block_t(blocks);  // [B, G*units], [P, G*units]
  // The per-step GEMM: packed bfloat16 products (a bfloat16 layer on a CPU with them), packed
  // float32, or matmul; W_hh^T of each block [P, G*units], and for bfloat16 h rounded per block.
  const bool bf16 = std::is_same_v<T, float> && bf16_products;
  std::vector<PackedMatrix> w_block_packed(use_packed_gemm<T>() && !bf16 ? blocks : 0);
  std::vector<PackedMatrixBf16> w_block_bf16(bf16 ? blocks : 0);
  const int64_t P_even = (P + 1) / 2 * 2;
  std::vector<std::vector<uint16_t>> h_bf16(bf16 ? blocks : 0);  // [B, P_even] each
  const bool use_matmul = w_block_packed.empty() && w_block_bf16.empty();
  // With a projection: per block, its rows of W_ih packed [I, G*units], its b_ih and its x_gates.
  const bool fused = projection != nullptr;
  const bool fused_bf16 = fused && projection->bf16;
  std::vector<PackedMatrix> w_ih_packed(fused && !fused_bf16 ? blocks : 0);
  std::vector<PackedMatrixBf16> w_ih_bf16(fused_bf16 ? blocks : 0);
  std::vector<std::vector<float>> b_ih_block(fused ? blocks : 0);
  std::vector<Tensor> x_gates_block(fused ? blocks : 0);  // [B, G*units]
  std::vector<ForwardStep<T>> steps(blocks);
  for (int64_t d = 0; d < D; ++d) {
    const bool reverse = d == 1;
    Tensor h_state = h_n[d];  // [B, P], double-buffered with h_other; left holding h_n
    h_state.copy_(h0[d]);
    Tensor c_state = lstm ? c_n[d] : Tensor();
    if (lstm) c_state.copy_(c0[d]);
    Tensor w_hr_t = projects ? w_hr[d].t() : Tensor();  // [H, P]
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t first = k * block_units, units = std::min(block_units, H - first);
      if (use_matmul) {  // [G*units, P] rows of W_hh
        Tensor w_block = blocks == 1
            ? w_hh[d]
            : w_hh[d].view({G, H, P}).narrow(1, first, units).reshape({G * units, P});
        w_block_t[k] = w_block.t();
      }
      if (!h_gates[k].defined()) h_gates[k] = at::empty({B, G * units}, output.options());
      ForwardStep<T>& step = steps[k];
      step.hidden = H;
      step.lengths = lengths;
      if (fused) {
        x_gates_block[k] = at::empty({B, G * units}, output.options());
        step.x_gates_row = G * units;
        step.x_gates_gate = units;
        step.x_gates_first = first;
      } else {
        step.x_gates_row = x_gates.stride(1);
        step.x_gates_gate = H;
        step.x_gates_first = 0;
      }
      step.h_gates = h_gates[k].data_ptr<T>();
      step.units = units;
      step.first_unit = first;
      step.bias = b_hh.defined() ? b_hh[d].data_ptr<T>() : zero_bias.data_ptr<T>();
      step.workspace_row = D * W;
      step.c_state = lstm ? c_state.data_ptr<T>() : nullptr;
      step.output_row = D * P;
      step.h_unprojected = projects ? h_unprojected.data_ptr<T>() : nullptr;
    }
    if constexpr (std::is_same_v<T, float>) {
      const float* weight = w_hh[d].data_ptr<float>();  // [G*H, P]
      // Room for block k's packed W_hh^T [P, G*units] (and W_ih^T [I, G*units], b_ih).
      const auto reset_block = [&](int64_t k) {
        const int64_t first = k * block_units, units = std::min(block_units, H - first);
        if (bf16) {
          w_block_bf16[k].reset(P, G * units);
          h_bf16[k].assign(B * P_even, 0);
        } else {
          w_block_packed[k].reset(P, G * units);
        }
        if (fused_bf16) w_ih_bf16[k].reset(projection->w_ih.size(1), G * units);
        if (fused && !fused_bf16) w_ih_packed[k].reset(projection->w_ih.size(1), G * units);
        if (fused) {  // entries d*G*H + g*H + first + j of b_ih
          b_ih_block[k].clear();
          if (projection->b_ih.defined()) {
            const float* b_ih = projection->b_ih.data_ptr<float>() + d * GH;
            for (int64_t n = 0; n < G * units; ++n) {
              b_ih_block[k].push_back(b_ih[(n / units) * H + first + n % units]);
            }
          }
        }
      };
      // Panels [p0, p1) of block k's weights: its columns of W_hh^T, rows of W_ih.
      const auto pack_block = [&](int64_t k, int64_t p0, int64_t p1) {
        const int64_t first = k * block_units, units = std::min(block_units, H - first);
        const auto column = [&](int64_t n) {
          return weight + ((n / units) * H + first + n % units) * P;
        };
        if (bf16) {
          w_block_bf16[k].pack_panels_by_column(column, p0, p1);
        } else {
          w_block_packed[k].pack_panels_by_column(column, p0, p1);
        }
        if (fused) {  // rows d*G*H + g*H + first + j of W_ih [D*G*H, I]
          const int64_t I = projection->w_ih.size(1);
          const float* w_ih = projection->w_ih.data_ptr<float>() + d * GH * I;
          const auto row = [&](int64_t n) {
            return w_ih + ((n / units) * H + first + n % units) * I;
          };
          if (fused_bf16) {
            w_ih_bf16[k].pack_panels_by_column(row, p0, p1);
          } else {
            w_ih_packed[k].pack_panels_by_column(row, p0, p1);
          }
        }
      };
      const auto panels_of = [&](int64_t k) {  // of every matrix of block k: G*units columns
        const int64_t units = std::min(block_units, H - k * block_units);
        return (G * units + PackedMatrix::kPanelColumns - 1) / PackedMatrix::kPanelColumns;
      };
      if (!use_matmul) pack_blocks(blocks, groups > 1, reset_block, pack_block, panels_of);
    }
    const T* x_gates_base = fused ? nullptr : x_gates.data_ptr<T>() + d * GH;
    T* workspace_base = save_gates ? workspace.data_ptr<T>() + d * W : nullptr;
    T* output_base = output.data_ptr<T>() + d * P;
    // h before step s (s counts the steps in processing order): without a projection h_n[d] at
    // even s and h_other at odd s; with one, h_n[d], which the projection updates in place.
    T* const h_buffers[2] = {h_state.data_ptr<T>(), h_other.data_ptr<T>()};
    // What step s of block k's rows [r0, r1) needs that earlier steps do not write: its pointers
    // and its x_gates (the projection of x_t, or a prefetch of the precomputed ones).
    const auto prepare_rows = [&](ForwardStep<T>& step, int64_t k, int64_t s, int64_t r0,
                                  int64_t r1) {
      const int64_t t = reverse ? T_ - 1 - s : s;
      step.t = t;
      step.x_gates = fused ? x_gates_block[k].data_ptr<T>() : x_gates_base + t * x_gates.stride(0);
      step.workspace = save_gates ? workspace_base + t * workspace.stride(0) : nullptr;
      step.output = output_base + t * B * D * P;
      step.h_prev = h_buffers[projects ? 0 : s % 2];
      step.h_next = projects ? nullptr : h_buffers[(s + 1) % 2];
      if constexpr (std::is_same_v<T, float>) {
        if (fused) {  // x_t W_ih^T + b_ih for this block of units
          const Tensor& x = projection->x;
          const int64_t row = G * step.units;
          float* x_gates_k = x_gates_block[k].data_ptr<float>() + r0 * row;
          const float* b_ih_k = b_ih_block[k].empty() ? nullptr : b_ih_block[k].data();
          const int64_t x_t = t * x.stride(0) + r0 * x.stride(1);
          if (fused_bf16) {
            const auto* x_bits = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
            packed_gemm_bf16(r1 - r0, x_bits + x_t, x.stride(1), w_ih_bf16[k], x_gates_k, row,
                             b_ih_k, false);
          } else {
            packed_gemm(r1 - r0, x.data_ptr<float>() + x_t, x.stride(1), w_ih_packed[k],
                        x_gates_k, row, b_ih_k, false);
          }
        }
      }
      if (!fused) prefetch_gate_inputs(step, r0, r1, G);  // read by the cell pass after the GEMM
    };
    // Step s of block k's rows [r0, r1): W_hh h_prev, then the cell pass.
    const auto step_rows = [&](const ForwardStep<T>& step, int64_t k, int64_t s, int64_t r0,
                               int64_t r1) {
      if (use_matmul) {  // all rows (groups == 1)
        matmul(h_gates[k], projects || s % 2 == 0 ? h_state : h_other, w_block_t[k], false);
      } else if constexpr (std::is_same_v<T, float>) {
        const int64_t row = G * step.units;
        float* h_gates_k = h_gates[k].data_ptr<float>() + r0 * row;
        if (bf16) {
          uint16_t* h_k = h_bf16[k].data() + r0 * P_even;
          to_bfloat16_rows(step.h_prev + r0 * P, r1 - r0, P, P, h_k, P_even);
          packed_gemm_bf16(r1 - r0, h_k, P_even, w_block_bf16[k], h_gates_k, row, nullptr,
                           false);
        } else {
          packed_gemm(r1 - r0, step.h_prev + r0 * P, P, w_block_packed[k], h_gates_k, row,
                      nullptr, false);
        }
      }
      for (int64_t b = r0; b < r1; ++b) {
        run_segment(info.cell, step, b, step.first_unit, step.first_unit + step.units);
      }
    };
    const auto prepare_blocks = [&](int64_t s, int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) prepare_rows(steps[k], k, s, 0, B);
    };
    const auto step_blocks = [&](int64_t s, int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) step_rows(steps[k], k, s, 0, B);
    };
    if (projects) {  // one block; h = W_hr (o * tanh(c)) where the sequence runs, else it stays
      for (int64_t s = 0; s < T_; ++s) {
        prepare_blocks(s, 0, blocks);
        step_blocks(s, 0, blocks);
        const int64_t t = reverse ? T_ - 1 - s : s;
        T* out = output_base + t * B * D * P;
        Tensor out_t = output[t].narrow(1, d * P, P);  // [B, P]
        at::mm_out(out_t, h_unprojected, w_hr_t);
        T* state = h_state.data_ptr<T>();
        for (int64_t b = 0; b < B; ++b) {
          T* row = out + b * D * P;
          if (lengths == nullptr || t < lengths[b]) {
            std::copy(row, row + P, state + b * P);
          } else {
            std::fill(row, row + P, T(0));
          }
        }
      }
    } else if (groups > 1) {  // each thread runs its rows through every step: no barrier
      for_each_row_group(B, groups, [&](int64_t r0, int64_t r1) {
        ForwardStep<T> step = steps[0];  // this group's copy
        for (int64_t s = 0; s < T_; ++s) {
          prepare_rows(step, 0, s, r0, r1);
          step_rows(step, 0, s, r0, r1);
        }
      });
      if (T_ % 2 == 1) h_state.copy_(h_other);  // h after the last step is in h_buffers[T % 2]
    } else {
      // The packed GEMMs and the cell passes do not throw: one parallel region for all steps.
      parallel_steps(T_, blocks, !use_matmul, prepare_blocks, step_blocks);
      if (T_ % 2 == 1) h_state.copy_(h_other);  // h after the last step is in h_buffers[T % 2]
    }
  }
}

}  // namespace

// One layer forward for x_gates [T, B, D*G*H], or, with a projection, for its x [T, B, I]; dtype:
// the layer's (x_gates of a bfloat16 layer may come in float32).
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> run_forward(
    const CellInfo& info, const Tensor& x_gates, const InputProjection* projection,
    const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace, at::ScalarType dtype) {
  const Tensor& rows = projection != nullptr ? projection->x : x_gates;  // [T, B, ...]
  const auto compute = compute_type(dtype);
  TORCH_CHECK(compute == at::kFloat || compute == at::kDouble,
              "fastrnn cpu: unsupported dtype ", dtype);
  const int64_t T_ = rows.size(0), B = rows.size(1);
  const int64_t D = w_hh.size(0), GH = w_hh.size(1), P = w_hh.size(2), H = GH / info.gates;
  const Tensor valid_steps = checked_lengths(lengths, T_, B);
  // bfloat16 layers multiply in bfloat16 (summing in float32) where the CPU has the instructions.
  const bool bf16_products = dtype == at::kBFloat16 && packed_gemm_bf16_supported();
  Tensor x = projection != nullptr ? Tensor() : x_gates.to(compute);
  if (x.defined() && x.stride(2) != 1) x = x.contiguous();
  auto options = rows.options().dtype(compute);
  Tensor output = empty_large({T_, B, D * P}, options);
  // Without a backward to come, no gates are saved (an empty workspace).
  Tensor workspace = keep_workspace
      ? empty_large({T_, B, D, info.workspace_gates * H}, options)
      : at::empty({0, B, D, info.workspace_gates * H}, options);
  Tensor h_n = at::empty({D, B, P}, options);
  Tensor c_n = info.cell == Cell::kLstm ? at::empty({D, B, H}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(compute, "fastrnn_cpu_layer_forward", [&] {
    forward_impl<scalar_t>(info, x, projection, to_compute(h0, compute),
                           to_compute(value_or_undefined(c0), compute), to_compute(w_hh, compute),
                           to_compute(value_or_undefined(b_hh), compute),
                           to_compute(value_or_undefined(w_hr), compute),
                           lengths_data(valid_steps), bf16_products, output, h_n, c_n,
                           workspace);
  });
  if (compute != dtype) {
    output = output.to(dtype);
    h_n = h_n.to(dtype);
    c_n = c_n.to(dtype);
  }
  return {output, h_n, c_n, workspace};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    std::string_view cell, const Tensor& x_gates, const Tensor& h0, const std::optional<Tensor>& c0,
    const Tensor& w_hh, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace) {
  return run_forward(cell_info(cell), x_gates, nullptr, h0, c0, w_hh, b_hh, w_hr, lengths,
                     keep_workspace, x_gates.scalar_type());
}

// Bytes of W_ih per direction above which a float32 layer's input projection runs as one GEMM
// over all steps (linear) before the recurrence instead of step by step inside it: inside, every
// step streams W_ih through the caches again (measured on a 2-core Zen 4: at 1 MiB, B16 H256,
// step by step is faster; at 4 MiB, B64 H512, one GEMM is).
constexpr int64_t kFusedProjectionMaxBytes = int64_t(2) << 20;
// Batch rows below which the input projection runs before the recurrence, one GEMM over all
// steps: a step of a few rows is bound by reading its weights, and reading W_ih at every step
// too would double that, where one GEMM over T * B rows reads W_ih once, at full speed.
constexpr int64_t kFusedProjectionMinBatch = 8;

// One layer forward from its input x [T, B, I]. The input projection runs step by step inside the
// recurrence (x_gates are never stored whole) for float32 where packed_gemm runs, W_ih is not
// large and the batch has kFusedProjectionMinBatch rows or more, each x_gates entry computed as
// linear() computes it, so the results are those of linear() then layer_forward(); and so for
// bfloat16 on AVX512_BF16 CPUs, with x_gates kept in float32 (linear_bf16 before the recurrence
// at fewer rows). Otherwise linear() runs before the recurrence.
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward_from_input(
    std::string_view cell, const Tensor& x, const Tensor& w_ih, const std::optional<Tensor>& b_ih,
    const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace) {
  const CellInfo info = cell_info(cell);
  TORCH_CHECK(x.dim() == 3 && w_ih.dim() == 2 && x.size(2) == w_ih.size(1) &&
                  w_ih.size(0) == w_hh.size(0) * w_hh.size(1),
              "fastrnn cpu: x [T, B, I] and w_ih [D*G*H, I] do not match");
  const auto all_of = [&](at::ScalarType dtype) {
    return x.scalar_type() == dtype && w_ih.scalar_type() == dtype &&
           (!b_ih.has_value() || b_ih->scalar_type() == dtype) && x.numel() > 0 &&
           w_ih.size(1) > 0;
  };
  const bool large_w_ih =
      w_ih.numel() * int64_t(sizeof(float)) > kFusedProjectionMaxBytes * w_hh.size(0);
  const bool few_rows = x.size(1) < kFusedProjectionMinBatch;
  const bool packed = all_of(at::kFloat) && use_packed_gemm<float>() && !large_w_ih && !few_rows;
  const bool bf16 = all_of(at::kBFloat16) && packed_gemm_bf16_supported();
  const auto dtype = x.scalar_type();
  if (bf16 && few_rows) {
    return run_forward(info, linear_bf16(x, w_ih, b_ih), nullptr, h0, c0, w_hh, b_hh, w_hr,
                       lengths, keep_workspace, dtype);
  }
  if (packed || bf16) {
    const int64_t I = x.size(2);
    Tensor rows = x.stride(2) == 1 ? x : x.contiguous();
    if (bf16 && I % 2 == 1) {  // rows of even length, zero-padded
      rows = at::zeros({x.size(0), x.size(1), I + 1}, x.options());
      rows.narrow(2, 0, I).copy_(x);
    }
    InputProjection projection{rows, w_ih.to(at::kFloat).contiguous(),
                               b_ih.has_value() ? b_ih->to(at::kFloat).contiguous() : Tensor(),
                               bf16};
    return run_forward(info, Tensor(), &projection, h0, c0, w_hh, b_hh, w_hr, lengths,
                       keep_workspace, dtype);
  }
  return run_forward(info, fastrnn_cpu::linear(x, w_ih, b_ih), nullptr, h0, c0, w_hh, b_hh, w_hr,
                     lengths, keep_workspace, dtype);
}

}  // namespace fastrnn_cpu
