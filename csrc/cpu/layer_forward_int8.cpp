// One layer forward with dynamically quantized int8 products (inference): the input projection
// as one int8 GEMM over all steps, then the time loop as layer_forward's (blocks of hidden units
// over threads, a barrier per step), each step's W_hh h in int8 (h quantized per row), the cell
// pass in float32 (cell_pass.h). Products as int8_gemm.h describes. Legend as in rnn_cpu.cpp.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <vector>

#include "cell_pass.h"
#include "int8_gemm.h"
#include "layer_plan.h"
#include "matmul.h"
#include "parallel_steps.h"
#include "rnn_ops.h"

namespace fastrnn_cpu {
namespace {

// One quantized weight [G*N, K]: its int8 rows packed per gate g in panels of 16 (int8_gemm.h:
// [G, ceil(N / 16), K4, 16, 4]), each row's scale and sum.
struct Int8Weight {
  const int8_t* panels;
  const float* scale;    // [G*N]
  const int32_t* sum;    // [G*N]
  int64_t depth;         // K
  int64_t gate_rows;     // N
  int64_t gate_bytes;    // of one gate's panels

  // The panels of rows [first, first + ...) of gate g (first a multiple of 16).
  const int8_t* panels_of(int64_t g, int64_t first) const {
    return panels + g * gate_bytes + first / kPanelRows * int8_panel_bytes(depth);
  }
};

// The checked contiguous parts of a weight of `gates` gates of `rows` rows of depth `depth`.
Int8Weight int8_weight(const char* name, const Tensor& panels, const Tensor& scale,
                       const Tensor& sum, int64_t gates, int64_t rows, int64_t depth) {
  const int64_t gate_bytes = (rows + kPanelRows - 1) / kPanelRows * int8_panel_bytes(depth);
  TORCH_CHECK(panels.scalar_type() == at::kChar && panels.numel() == gates * gate_bytes &&
                  panels.is_contiguous(),
              "fastrnn cpu int8: ", name, " must be its int8 rows packed in panels: ",
              gates * gate_bytes, " contiguous bytes");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == gates * rows &&
                  scale.is_contiguous(),
              "fastrnn cpu int8: the scale of ", name, " must be ", gates * rows,
              " contiguous floats");
  TORCH_CHECK(sum.scalar_type() == at::kInt && sum.numel() == gates * rows && sum.is_contiguous(),
              "fastrnn cpu int8: the sum of ", name, " must be ", gates * rows,
              " contiguous int32s");
  return {panels.data_ptr<int8_t>(), scale.data_ptr<float>(), sum.data_ptr<int32_t>(), depth,
          rows, gate_bytes};
}

// A float32 tensor of `numel` entries, contiguous (undefined stays undefined).
Tensor float_tensor(const char* name, const Tensor& t, int64_t numel) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == numel,
              "fastrnn cpu int8: ", name, " must be float32 with ", numel, " entries");
  return t.contiguous();
}

// y [rows_y, G*N] (rows ldy apart) = x [rows_y, K] (rows ldx apart) w^T + bias, rows split over
// threads in blocks.
void project_rows(const float* x, int64_t rows_y, int64_t ldx, const Int8Weight& w,
                  int64_t gates, const float* bias, float* y, int64_t ldy) {
  const int64_t K = w.depth, N = w.gate_rows, stride = int8_row_stride(K);
  constexpr int64_t kBlock = 64;
  parallel_for(0, (rows_y + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(kBlock * stride);
    float scales[kBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kBlock, count = std::min(kBlock, rows_y - r0);
      quantize_rows(x + r0 * ldx, count, K, ldx, q.data(), stride, scales);
      for (int64_t g = 0; g < gates; ++g) {
        gemm_int8(N, K, w.panels_of(g, 0), w.scale + g * N, w.sum + g * N, q.data(), stride,
                  scales, count, y + r0 * ldy + g * N, ldy,
                  bias == nullptr ? nullptr : bias + g * N);
      }
    }
  });
}

// Bytes of int8 W_hh (per direction) from which the steps split over threads by units.
constexpr int64_t kSplitBytes = int64_t(512) << 10;
// Batch rows per thread from which the steps split by rows: a whole tile of the vnni kernels.
constexpr int64_t kRowsPerGroup = 8;

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_forward_int8(std::string_view cell, const Tensor& x,
                                                      const Tensor& h0,
                                                      const std::optional<Tensor>& c0,
                                                      at::TensorList weights, bool has_biases,
                                                      const std::optional<Tensor>& lengths) {
  const CellInfo info = cell_info(cell);
  const bool lstm = info.cell == Cell::kLstm;
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat,
              "fastrnn cpu int8: x must be a float32 tensor [T, B, I]");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) >= 1 && h0.size(0) <= 2,
              "fastrnn cpu int8: h0 must be [D, B, P]");
  const int64_t T_ = x.size(0), B = x.size(1), I = x.size(2), D = h0.size(0), P = h0.size(2);
  const int64_t plain = has_biases ? 8 : 6;  // weights per direction without a projection
  const int64_t per = static_cast<int64_t>(weights.size()) / D;
  TORCH_CHECK(per * D == static_cast<int64_t>(weights.size()) &&
                  (per == plain || (lstm && per == plain + 3)),
              "fastrnn cpu int8: expected ", plain, " weights per direction (", plain + 3,
              " with a projection), got ", weights.size(), " for ", D, " directions");
  const bool projects = per == plain + 3;
  const int64_t G = info.gates, GH = weights[4].numel(), H = GH / G;  // w_hh's scales
  TORCH_CHECK(GH == G * H && H > 0 && T_ > 0 && (projects || P == H),
              "fastrnn cpu int8: w_hh does not match the cell and h0");
  std::vector<Int8Weight> ih(D), hh(D), hr(D);
  std::vector<Tensor> biases_ih(D), biases_hh(D);
  for (int64_t d = 0; d < D; ++d) {
    const Tensor* w = weights.data() + d * per;
    ih[d] = int8_weight("w_ih", w[0], w[1], w[2], G, H, I);
    hh[d] = int8_weight("w_hh", w[3], w[4], w[5], G, H, P);
    biases_ih[d] = has_biases ? float_tensor("b_ih", w[6], GH) : Tensor();
    biases_hh[d] = has_biases ? float_tensor("b_hh", w[7], GH) : at::zeros({GH}, x.options());
    if (projects) hr[d] = int8_weight("w_hr", w[plain], w[plain + 1], w[plain + 2], 1, P, H);
  }
  TORCH_CHECK(h0.scalar_type() == at::kFloat && h0.size(1) == B,
              "fastrnn cpu int8: h0 must be float32 [D, B, P]");
  TORCH_CHECK(!lstm || (c0.has_value() && c0->scalar_type() == at::kFloat &&
                        c0->sizes() == at::IntArrayRef({D, B, H})),
              "fastrnn cpu int8: c0 must be float32 [D, B, H]");
  const Tensor valid_steps = checked_lengths(lengths, T_, B);
  const int64_t* steps_of = lengths_data(valid_steps);

  auto options = x.options();
  Tensor output = empty_large({T_, B, D * P}, options);
  Tensor h_n = at::empty({D, B, P}, options);
  Tensor c_n = lstm ? at::empty({D, B, H}, options) : at::empty({0}, options);
  if (B == 0) return {output, h_n, c_n};
  // x W_ih^T + b_ih of every step and direction: [T, B, D*G*H]
  Tensor x_gates = empty_large({T_, B, D * GH}, options);
  const Tensor x_rows = x.stride(2) == 1 && x.stride(0) == B * x.stride(1) ? x : x.contiguous();
  for (int64_t d = 0; d < D; ++d) {
    project_rows(x_rows.data_ptr<float>(), T_ * B, x_rows.stride(1), ih[d], G,
                 has_biases ? biases_ih[d].data_ptr<float>() : nullptr,
                 x_gates.data_ptr<float>() + d * GH, D * GH);
  }

  // The steps split over threads by groups of batch rows where each thread gets a whole tile
  // of rows (each runs its rows through every step with the whole of W_hh, no barrier), else
  // by blocks of units only where W_hh is large: an int8 step is short, and on small weights
  // the barrier per step costs more than a thread saves (measured on a 2-core Zen 4: H128
  // slower on 2 threads, H256 even).
  const int64_t groups =
      projects ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                             B / kRowsPerGroup));
  // A single step from a zero state has no product to split (gemm_int8 reads no weights).
  const Tensor h_initial = h0.contiguous();
  const float* h_first = h_initial.data_ptr<float>();
  const bool cells_only =
      T_ == 1 && std::all_of(h_first, h_first + D * B * P, [](float v) { return v == 0.0f; });
  const int64_t block_units =
      projects || groups > 1 || cells_only || GH * P < kSplitBytes ? H : units_per_block(H);
  const int64_t blocks = (H + block_units - 1) / block_units;
  const int64_t h_stride = int8_row_stride(P);
  // What one block of units (or group of rows) works in: W_hh h of its units [B, G*units], h
  // quantized [B, h_stride] and its scales [B]; a group of rows uses its own rows of each.
  struct Scratch {
    std::vector<float> gates;
    std::vector<int8_t> q;
    std::vector<float> scale;
  };
  const auto scratch_for = [&](int64_t units) {
    return Scratch{std::vector<float>(B * G * units), std::vector<int8_t>(B * h_stride),
                   std::vector<float>(B)};
  };
  std::vector<Scratch> scratch;
  for (int64_t k = 0; k < blocks; ++k) {
    scratch.push_back(scratch_for(std::min(block_units, H - k * block_units)));
  }
  std::vector<float> h_other(B * P);
  std::vector<float> h_unprojected(projects ? B * H : 0), projected(projects ? B * P : 0);
  std::vector<int8_t> u_q(projects ? B * int8_row_stride(H) : 0);
  std::vector<float> u_scale(projects ? B : 0);
  const Tensor c_initial = lstm ? c0->contiguous() : Tensor();
  for (int64_t d = 0; d < D; ++d) {
    const bool reverse = d == 1;
    // [B, P], double-buffered with h_other; left holding h_n
    float* h_state = h_n.data_ptr<float>() + d * B * P;
    std::copy_n(h_initial.data_ptr<float>() + d * B * P, B * P, h_state);
    float* c_state = lstm ? c_n.data_ptr<float>() + d * B * H : nullptr;
    if (lstm) std::copy_n(c_initial.data_ptr<float>() + d * B * H, B * H, c_state);
    std::vector<ForwardStep<float>> steps(blocks);
    for (int64_t k = 0; k < blocks; ++k) {
      ForwardStep<float>& step = steps[k];
      step = ForwardStep<float>{};
      step.hidden = H;
      step.lengths = steps_of;
      step.x_gates_row = D * GH;
      step.x_gates_gate = H;
      step.x_gates_first = 0;
      step.h_gates = scratch[k].gates.data();
      step.first_unit = k * block_units;
      step.units = std::min(block_units, H - step.first_unit);
      step.bias = biases_hh[d].data_ptr<float>();
      step.workspace = nullptr;
      step.workspace_row = 0;
      step.c_state = c_state;
      step.output_row = D * P;
      step.h_unprojected = projects ? h_unprojected.data() : nullptr;
    }
    const Int8Weight& w_d = hh[d];
    float* const h_buffers[2] = {h_state, h_other.data()};
    const float* x_gates_d = x_gates.data_ptr<float>() + d * GH;
    float* output_d = output.data_ptr<float>() + d * P;
    // The pointers of step s (h before it: without a projection h_n[d] at even s and h_other
    // at odd s; with one, h_n[d], which the projection updates in place).
    const auto point_at = [&](ForwardStep<float>& step, int64_t s) {
      const int64_t t = reverse ? T_ - 1 - s : s;
      step.t = t;
      step.x_gates = x_gates_d + t * B * D * GH;
      step.output = output_d + t * B * D * P;
      step.h_prev = h_buffers[projects ? 0 : s % 2];
      step.h_next = projects ? nullptr : h_buffers[(s + 1) % 2];
    };
    // Rows [r0, r1) of a step's block of units: h quantized, the block's rows of W_hh (G ranges
    // of its units) times h, the cell pass.
    // Odd steps read the gates' rows last to first (serpentine: what one step read last is
    // still in the L2 cache when the next starts).
    const auto run_rows = [&](const ForwardStep<float>& step, Scratch& work, int64_t r0,
                              int64_t r1) {
      const int64_t units = step.units, first = step.first_unit;
      int8_t* q = work.q.data() + r0 * h_stride;
      float* scale = work.scale.data() + r0;
      quantize_rows(step.h_prev + r0 * P, r1 - r0, P, P, q, h_stride, scale);
      const bool backwards = (reverse ? T_ - 1 - step.t : step.t) % 2 == 1;
      for (int64_t i = 0; i < G; ++i) {
        const int64_t g = backwards ? G - 1 - i : i, row = g * H + first;
        gemm_int8(units, P, w_d.panels_of(g, first), w_d.scale + row, w_d.sum + row, q,
                  h_stride, scale, r1 - r0, work.gates.data() + r0 * G * units + g * units,
                  G * units, nullptr, backwards);
      }
      for (int64_t b = r0; b < r1; ++b) run_segment(info.cell, step, b, first, first + units);
    };
    if (projects) {  // one block; h = W_hr (o * tanh(c)) where the sequence runs, else it stays
      const int64_t u_stride = int8_row_stride(H);
      for (int64_t s = 0; s < T_; ++s) {
        point_at(steps[0], s);
        run_rows(steps[0], scratch[0], 0, B);
        const int64_t t = steps[0].t;
        quantize_rows(h_unprojected.data(), B, H, H, u_q.data(), u_stride, u_scale.data());
        float* out = projected.data();
        gemm_int8(P, H, hr[d].panels, hr[d].scale, hr[d].sum, u_q.data(),
                  u_stride, u_scale.data(), B, out, P, nullptr);
        float* out_t = output_d + t * B * D * P;
        for (int64_t b = 0; b < B; ++b) {
          float* row = out_t + b * D * P;
          if (steps_of == nullptr || t < steps_of[b]) {
            std::copy(out + b * P, out + (b + 1) * P, row);
            std::copy(out + b * P, out + (b + 1) * P, h_state + b * P);
          } else {
            std::fill(row, row + P, 0.0f);
          }
        }
      }
    } else if (groups > 1) {  // one block; rows [r0, r1) per thread, through every step
      for_each_row_group(B, groups, [&](int64_t r0, int64_t r1) {
        ForwardStep<float> step = steps[0];  // this group's copy, with its own scratch
        Scratch work = scratch_for(H);
        step.h_gates = work.gates.data();
        for (int64_t s = 0; s < T_; ++s) {
          point_at(step, s);
          run_rows(step, work, r0, r1);
        }
      });
    } else {
      const auto prepare_blocks = [&](int64_t s, int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          point_at(steps[k], s);
          prefetch_gate_inputs(steps[k], 0, B, G);  // read by the cell pass after the product
        }
      };
      const auto step_blocks = [&](int64_t s, int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) run_rows(steps[k], scratch[k], 0, B);
      };
      parallel_steps(T_, blocks, true, prepare_blocks, step_blocks);
    }
    if (!projects && T_ % 2 == 1) {  // h after the last step is in h_buffers[T % 2]
      std::copy(h_other.begin(), h_other.end(), h_state);
    }
  }
  return {output, h_n, c_n};
}

}  // namespace fastrnn_cpu
