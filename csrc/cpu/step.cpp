// One step of a cell (rnn_ops.h: cell_step_forward, cell_step_backward).

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <tuple>
#include <vector>

#include "cell_pass.h"
#include "kernel_attributes.h"
#include "layer_plan.h"
#include "matmul.h"
#include "packed_gemm.h"
#include "parallel_steps.h"
#include "rnn_ops.h"

namespace fastrnn_cpu {
namespace {

// ---- one step of a cell (cell_step_forward, cell_step_backward) -----------------------------
// A step of an LSTMCell, GRUCell or RNNCell, or a layer call with T = 1: the input projection,
// the recurrent product and the cell in one call, without packing the weights: a step reads
// them once, as they lie. At B <= kGemvBatch each gate row is a dot product (gemv_rows) with
// each row of x and h; from kPackedBatch on (AVX-512) the weights are the a operand of
// packed_gemm against the packed x^T and h^T ([K, B], a few KiB), giving gates^T [G*H, B],
// transposed for the cell; otherwise ATen's GEMMs. Nothing of the weights is kept between calls
// (a weight changed through .data leaves no trace in its version counter), so no weight can be
// stale. The units
// split over threads in blocks of 16; a block's gate rows of W_ih and W_hh, its cell pass and
// its outputs are its thread's alone, so a step has no barrier.

// Batch rows up to which a step multiplies by dot products (gemv_rows, one pass over the weights
// per row) instead of packed_gemm with the weights as a operand (32 batch columns per pass).
constexpr int64_t kGemvBatch = 4;
// Batch rows below which, above kGemvBatch, the products are ATen's GEMMs instead: packed_gemm's
// tiles of 16 or 32 batch columns would multiply mostly padding. On AVX2 CPUs they are ATen's
// too where the weights exceed kPackedAvx2Bytes per thread of the step: its 6-row, 16-column
// tiles read each weight row once per 16 batch columns, from the L3 cache or memory once the
// weights outgrow the L2 caches. Measured (LSTMCell, one thread, time / torch.nn's): 2 MiB
// (B32 and B64 H256) 0.79 and 0.89 against ATen's 0.90 and 1.15, 4.7 MiB (B32 H384) 0.89
// against 0.94, but 6.3 MiB (B32 H512) 1.18 against 0.97; on two threads 0.71 against 0.97.
constexpr int64_t kPackedBatch = 12;
constexpr int64_t kPackedAvx2Bytes = int64_t(5) << 20;
// Multiply-adds of a step below which it stays on one thread. A fork costs a few us in a tight
// loop, but between the calls of a step loop the OpenMP workers idle, and on the project's
// 2-core VM waking them cost ~60 us for minutes at a time: an RNNCell step at B16 H256 (2.1 M)
// took 99-104 us on two threads then, 55 us otherwise, and 72 us on one thread. From 4 M
// (~120-250 us alone) the split pays for that wake-up too.
constexpr int64_t kStepParallelWork = int64_t(1) << 22;

// out[:, columns first .. first+count) of [B, ldo] = w[first .. first+count) [count, K] (rows K
// apart) times a^T for a [B, K], + bias[first ..] (or null); packed_a: a^T packed (B > kGemvBatch).
void step_product(int64_t batch, const float* a, int64_t depth, const PackedMatrix& packed_a,
                  const float* w, const float* bias, int64_t first, int64_t count, float* out,
                  int64_t ldo, float* scratch) {
  if (batch <= kGemvBatch) {
    gemv_rows(count, depth, w + first * depth, depth, a, depth, batch, out + first, ldo,
              bias == nullptr ? nullptr : bias + first);
    return;
  }
  // scratch [count, B]: gates^T of these rows, then transposed into out with the bias; by blocks
  // of rows, which packed_gemm reads again for each panel of batch columns (AVX2: each half),
  // so that they come from the L2 cache the second time rather than from memory
  constexpr int64_t kRowBlock = 64;
  for (int64_t r = 0; r < count; r += kRowBlock) {
    packed_gemm(std::min(kRowBlock, count - r), w + (first + r) * depth, depth, packed_a,
                scratch + r * batch, batch, nullptr, false);
  }
  for (int64_t b = 0; b < batch; ++b) {
    float* row = out + b * ldo + first;
    #pragma GCC ivdep
    for (int64_t n = 0; n < count; ++n) {
      row[n] = scratch[n * batch + b] + (bias == nullptr ? 0.0f : bias[first + n]);
    }
  }
}

// One step forward, float32. x [B, I], h [B, H], c [B, H] (LSTM), w_ih [G*H, I], w_hh [G*H, H],
// b_ih, b_hh [G*H] or undefined, all contiguous. Writes h_new [B, H], c_new [B, H] (LSTM) and,
// when defined, workspace [B, W]. zero_h: h is zeros (a layer's default state), so every row of
// h W_hh^T is that of row 0, multiplied once and copied (its entries are 0 or, where a row of
// W_hh holds an inf or NaN, NaN, as a product of every row gives them).
void step_forward_f32(const CellInfo& info, const Tensor& x, const Tensor& h, const Tensor& c,
                      const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                      const Tensor& b_hh, bool zero_h, Tensor& h_new, Tensor& c_new,
                      Tensor& workspace) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1), G = info.gates, GH = G * H;
  const bool lstm = info.cell == Cell::kLstm;
  const bool gemv = B <= kGemvBatch;
  // x_gates, h_gates [B, G*H], h_next [B, H]; gates^T scratch [G*H, B] for each product
  Tensor buffer = at::empty({2 * B * GH + B * H + (gemv ? 0 : 2 * GH * B)}, x.options());
  float* x_gates = buffer.data_ptr<float>();
  float* h_gates = x_gates + B * GH;
  float* h_next = h_gates + B * GH;
  float* scratch = h_next + B * H;
  Tensor zero_bias = b_hh.defined() ? Tensor() : at::zeros({GH}, x.options());
  PackedMatrix x_t, h_t;  // [I, B], [H, B]
  const bool split = B * GH * (I + H) >= kStepParallelWork;
  const int64_t threads = split ? at::get_num_threads() : 1;
  const bool large = int64_t(sizeof(float)) * GH * (I + H) > kPackedAvx2Bytes * threads;
  const bool aten = !gemv && (B < kPackedBatch || (large && !avx512_kernels()));
  if (aten) {  // x_gates = x W_ih^T + b_ih, h_gates = h W_hh^T
    Tensor x_gates_t = buffer.narrow(0, 0, B * GH).view({B, GH});
    Tensor h_gates_t = buffer.narrow(0, B * GH, B * GH).view({B, GH});
    if (b_ih.defined()) {
      at::addmm_out(x_gates_t, b_ih, x, w_ih.t());
    } else {
      at::mm_out(x_gates_t, x, w_ih.t());
    }
    if (zero_h) {
      Tensor first_row = h_gates_t.narrow(0, 0, 1);
      at::mm_out(first_row, h.narrow(0, 0, 1), w_hh.t());
      h_gates_t.narrow(0, 1, B - 1).copy_(first_row.expand({B - 1, GH}));
    } else {
      at::mm_out(h_gates_t, h, w_hh.t());
    }
  } else if (!gemv) {
    x_t.pack(x.data_ptr<float>(), I, B, 1, I);
    if (!zero_h) h_t.pack(h.data_ptr<float>(), H, B, 1, H);
  }
  if (lstm) std::memcpy(c_new.data_ptr<float>(), c.data_ptr<float>(), sizeof(float) * B * H);
  ForwardStep<float> step{};
  step.hidden = H;
  step.t = 0;
  step.lengths = nullptr;
  step.x_gates = x_gates;
  step.x_gates_row = GH;
  step.x_gates_gate = H;
  step.x_gates_first = 0;
  step.h_gates = h_gates;
  step.units = H;
  step.first_unit = 0;
  step.bias = b_hh.defined() ? b_hh.data_ptr<float>() : zero_bias.data_ptr<float>();
  step.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  step.workspace_row = info.workspace_gates * H;
  step.h_prev = h.data_ptr<float>();
  step.h_next = h_next;
  step.c_state = lstm ? c_new.data_ptr<float>() : nullptr;
  step.output = h_new.data_ptr<float>();
  step.output_row = H;
  step.h_unprojected = nullptr;
  const float* bias_ih = b_ih.defined() ? b_ih.data_ptr<float>() : nullptr;
  const int64_t unit_blocks = (H + 15) / 16;
  // split when the blocks include the products; the cell pass alone is too short to split
  const int64_t grain = split && !aten ? 1 : unit_blocks;
  parallel_for(0, unit_blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t j0 = begin * 16, j1 = std::min(H, end * 16);
    for (int64_t g = 0; g < G && !aten; ++g) {  // gate rows g*H + [j0, j1) of both products
      const int64_t first = g * H + j0;
      step_product(B, x.data_ptr<float>(), I, x_t, w_ih.data_ptr<float>(), bias_ih, first,
                   j1 - j0, x_gates, GH, scratch + first * B);
      step_product(zero_h ? 1 : B, h.data_ptr<float>(), H, h_t, w_hh.data_ptr<float>(),
                   nullptr, first, j1 - j0, h_gates, GH, scratch + GH * B + first * B);
      for (int64_t b = 1; zero_h && b < B; ++b) {
        std::memcpy(h_gates + b * GH + first, h_gates + first, sizeof(float) * (j1 - j0));
      }
    }
    for (int64_t b = 0; b < B; ++b) run_segment(info.cell, step, b, j0, j1);
  });
}

// One step forward of a bfloat16 cell at B <= kGemvBatch (AVX512_BF16 or AVX2): x [B, I],
// h [B, H], w_ih [G*H, I], w_hh [G*H, H] bfloat16, contiguous; b_ih, b_hh [G*H] float32 or
// undefined; c [B, H] float32 (LSTM). The products are bfloat16 dot products over the weights
// as they lie (gemv_rows_bf16), summed in float32; the cell runs in float32. Writes h_new,
// c_new [B, H] float32 and, when defined, workspace [B, W]. zero_h as in step_forward_f32.
void step_forward_bf16(const CellInfo& info, const Tensor& x, const Tensor& h, const Tensor& c,
                       const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                       const Tensor& b_hh, bool zero_h, Tensor& h_new, Tensor& c_new,
                       Tensor& workspace) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1), GH = info.gates * H;
  const bool lstm = info.cell == Cell::kLstm;
  Tensor buffer = at::empty({2 * B * GH + B * H + B * H}, x.options().dtype(at::kFloat));
  float* x_gates = buffer.data_ptr<float>();
  float* h_gates = x_gates + B * GH;
  float* h_next = h_gates + B * GH;
  float* h_prev = h_next + B * H;  // h in float32, for the cell
  const auto bits = [](const Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  };
  const float* bias_ih = b_ih.defined() ? b_ih.data_ptr<float>() : nullptr;
  gemv_rows_bf16(GH, I, bits(w_ih), I, bits(x), I, B, x_gates, GH, bias_ih);
  gemv_rows_bf16(GH, H, bits(w_hh), H, bits(h), H, zero_h ? 1 : B, h_gates, GH, nullptr);
  for (int64_t b = 1; zero_h && b < B; ++b) {
    std::memcpy(h_gates + b * GH, h_gates, sizeof(float) * GH);
  }
  buffer.narrow(0, 2 * B * GH + B * H, B * H).copy_(h.reshape({-1}));
  if (lstm) c_new.copy_(c);
  Tensor zero_bias = b_hh.defined() ? Tensor() : at::zeros({GH}, buffer.options());
  ForwardStep<float> step{};
  step.hidden = H;
  step.x_gates = x_gates;
  step.x_gates_row = GH;
  step.x_gates_gate = H;
  step.h_gates = h_gates;
  step.units = H;
  step.bias = b_hh.defined() ? b_hh.data_ptr<float>() : zero_bias.data_ptr<float>();
  step.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  step.workspace_row = info.workspace_gates * H;
  step.h_prev = h_prev;
  step.h_next = h_next;
  step.c_state = lstm ? c_new.data_ptr<float>() : nullptr;
  step.output = h_new.data_ptr<float>();
  step.output_row = H;
  for (int64_t b = 0; b < B; ++b) run_segment(info.cell, step, b, 0, H);
}

// result [N, K] = g^T a for g [B, N], a [B, K] (float32, contiguous, B <= kGemvBatch): a weight
// gradient of one step, as B rank-one updates written row by row.
FASTRNN_CLONES void outer_sum_rows(int64_t batch, int64_t rows, int64_t depth, const float* g,
                                   const float* a, float* result) {
  for (int64_t n = 0; n < rows; ++n) {
    float* __restrict row = result + n * depth;
    const float g0 = g[n];
    const float* __restrict a0 = a;
    #pragma GCC ivdep
    for (int64_t k = 0; k < depth; ++k) row[k] = g0 * a0[k];
    for (int64_t b = 1; b < batch; ++b) {
      const float gb = g[b * rows + n];
      const float* __restrict ab = a + b * depth;
      #pragma GCC ivdep
      for (int64_t k = 0; k < depth; ++k) row[k] += gb * ab[k];
    }
  }
}

Tensor outer_sum(const Tensor& g, const Tensor& a) {
  Tensor result = at::empty({g.size(1), a.size(1)}, a.options());
  outer_sum_rows(g.size(0), g.size(1), a.size(1), g.data_ptr<float>(), a.data_ptr<float>(),
                 result.data_ptr<float>());
  return result;
}

// One step of cell `cell` (see above) into h_new and c_new (LSTM; else unused): B*H contiguous
// elements each, of x's dtype, in any shape. Returns the workspace [B, W] (in the compute dtype:
// float32 for the half types, as a layer's) when keep_workspace, what cell_step_backward needs,
// in the layout of a layer's workspace at T = 1, D = 1; else an undefined tensor. zero_h: h is
// zeros (step_forward_f32).
Tensor step_forward(std::string_view cell, const Tensor& x, const Tensor& h,
                    const std::optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
                    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                    bool keep_workspace, bool zero_h, Tensor& h_new, Tensor& c_new) {
  const at::NoGradGuard no_grad;  // the op is differentiated by its callers (ops._EagerStep)
  const CellInfo info = cell_info(cell);
  const bool lstm = info.cell == Cell::kLstm;
  const int64_t B = x.size(0), H = h.size(1), GH = info.gates * H;
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && h.size(0) == B && w_ih.dim() == 2 &&
                  w_hh.dim() == 2 && w_ih.size(0) == GH && w_ih.size(1) == x.size(1) &&
                  w_hh.size(0) == GH && w_hh.size(1) == H && (!lstm || c.has_value()),
              "fastrnn cpu: cell step shapes do not match");
  const auto dtype = x.scalar_type();
  const int64_t W = info.workspace_gates * H;
  const auto ws_options = x.options().dtype(compute_type(dtype));
  Tensor workspace = keep_workspace ? at::empty({B, W}, ws_options) : Tensor();
  const auto all_of = [&](at::ScalarType type) {
    return dtype == type && h.scalar_type() == type && w_ih.scalar_type() == type &&
           w_hh.scalar_type() == type && B > 0 && H > 0 && x.size(1) > 0;
  };
  if (all_of(at::kBFloat16) && gemv_bf16_supported() && B <= kGemvBatch) {
    Tensor h_float = at::empty({B, H}, ws_options);
    Tensor c_float = lstm ? at::empty({B, H}, ws_options) : Tensor();
    step_forward_bf16(info, x.contiguous(), h.contiguous(), lstm ? c->to(at::kFloat) : Tensor(),
                      w_ih.contiguous(), w_hh.contiguous(),
                      to_compute(value_or_undefined(b_ih), at::kFloat),
                      to_compute(value_or_undefined(b_hh), at::kFloat), zero_h, h_float,
                      c_float, workspace);
    h_new.view({B, H}).copy_(h_float);
    if (lstm) c_new.view({B, H}).copy_(c_float);
    return workspace;
  }
  if (all_of(at::kFloat) && use_packed_gemm<float>()) {
    step_forward_f32(info, x.contiguous(), h.contiguous(),
                     lstm ? c->contiguous().to(at::kFloat) : Tensor(), w_ih.contiguous(),
                     w_hh.contiguous(), to_compute(value_or_undefined(b_ih), at::kFloat),
                     to_compute(value_or_undefined(b_hh), at::kFloat), zero_h, h_new, c_new,
                     workspace);
    return workspace;
  }
  // elsewhere: the layer kernel at T = 1
  auto [output, h_n, c_n, layer_workspace] = layer_forward_from_input(
      cell, x.unsqueeze(0), w_ih, b_ih, h.unsqueeze(0),
      lstm ? std::optional<Tensor>(c->unsqueeze(0)) : std::nullopt, w_hh.unsqueeze(0),
      b_hh.has_value() ? std::optional<Tensor>(b_hh->unsqueeze(0)) : std::nullopt, std::nullopt,
      std::nullopt, keep_workspace);
  h_new.view({B, H}).copy_(h_n[0]);
  if (lstm) c_new.view({B, H}).copy_(c_n[0]);
  if (keep_workspace) workspace.copy_(layer_workspace.view({B, W}));
  return workspace;
}

}  // namespace

// (h_new [B, H], c_new [B, H] or [0], workspace [B, W] or [0, W]): one step of cell `cell`, see
// step_forward.
std::tuple<Tensor, Tensor, Tensor> cell_step_forward(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, bool keep_workspace) {
  const CellInfo info = cell_info(cell);
  const bool lstm = info.cell == Cell::kLstm;
  const int64_t B = x.size(0), H = h.size(1);
  Tensor h_new = at::empty({B, H}, x.options());
  Tensor c_new = lstm ? at::empty({B, H}, x.options()) : at::empty({0}, x.options());
  Tensor workspace = step_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, keep_workspace, false,
                                  h_new, c_new);
  if (!keep_workspace) {
    workspace = at::empty({0, info.workspace_gates * H},
                          x.options().dtype(compute_type(x.scalar_type())));
  }
  return {h_new, c_new, workspace};
}

// layer_step (rnn_ops.h): step_forward with a layer's shapes around it; without h0 the recurrent
// product is that of one zero row.
std::vector<Tensor> layer_step(std::string_view cell, const Tensor& input,
                               const std::optional<Tensor>& h0, const std::optional<Tensor>& c0,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh, bool batch_first) {
  const bool lstm = cell_info(cell).cell == Cell::kLstm;
  TORCH_CHECK(input.dim() == 3 && input.size(batch_first ? 1 : 0) == 1 && w_hh.dim() == 2,
              "fastrnn cpu: layer_step takes one step of a batched input");
  const int64_t B = input.size(batch_first ? 0 : 1), H = w_hh.size(1);
  const auto options = input.options();
  const auto state = [&](const std::optional<Tensor>& given) {  // [1, B, H] or zeros -> [B, H]
    if (!given.has_value()) return at::zeros({B, H}, options);
    TORCH_CHECK(given->dim() == 3 && given->size(0) == 1 && given->size(1) == B &&
                    given->size(2) == H, "fastrnn cpu: layer_step state shapes do not match");
    return given->reshape({B, H});
  };
  std::vector<Tensor> result{at::empty(batch_first ? at::IntArrayRef{B, 1, H}
                                                   : at::IntArrayRef{1, B, H}, options),
                             at::empty({1, B, H}, options)};
  Tensor c_n = lstm ? at::empty({1, B, H}, options) : Tensor();
  step_forward(cell, input.reshape({B, input.size(2)}), state(h0),
               lstm ? std::optional<Tensor>(state(c0)) : std::nullopt, w_ih, w_hh, b_ih, b_hh,
               false, !h0.has_value(), result[1], c_n);
  // the output a tensor of its own, as torch.nn's ([B, 1, H] and [1, B, H] lie alike)
  std::memcpy(result[0].data_ptr(), result[1].data_ptr(), result[1].nbytes());
  if (lstm) result.push_back(c_n);
  return result;
}

// The gradients of one step (cell_step_forward with keep_workspace) for those of h_new and c_new
// (undefined: zero): (grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh), each
// an empty [0] tensor where output_mask (7 entries, in that order) says it is not wanted. The
// cell pass is the layer backward's; the products are ATen's, as torch.nn's cells run them.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_step_backward(
    std::string_view cell, const std::optional<Tensor>& grad_h_new,
    const std::optional<Tensor>& grad_c_new, const Tensor& x, const Tensor& h,
    const std::optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh, const Tensor& h_new,
    const Tensor& workspace, std::array<bool, 7> output_mask) {
  const at::NoGradGuard no_grad;
  const CellInfo info = cell_info(cell);
  const bool lstm = info.cell == Cell::kLstm, gru = info.cell == Cell::kGru;
  const auto dtype = x.scalar_type();
  const auto compute = compute_type(dtype);
  TORCH_CHECK(compute == at::kFloat || compute == at::kDouble,
              "fastrnn cpu: unsupported dtype ", dtype);
  const int64_t B = x.size(0), H = h.size(1), GH = info.gates * H;
  const auto options = x.options().dtype(compute);
  Tensor grad_h = grad_h_new.has_value() ? to_compute(*grad_h_new, compute)
                                         : at::zeros({B, H}, options);
  Tensor grad_c = lstm ? (grad_c_new.has_value() ? grad_c_new->to(compute, false, true)
                                                 : at::zeros({B, H}, options))
                       : Tensor();  // in: grad c_new; out: grad c
  Tensor grad_h_direct = at::empty({B, H}, options);  // grad h not through W_hh (GRU: z dh)
  Tensor grad_x_gates = at::empty({B, GH}, options);
  Tensor grad_h_gates = gru ? at::empty({B, GH}, options) : grad_x_gates;
  Tensor h_c = to_compute(h, compute), h_new_c = to_compute(h_new, compute);
  Tensor c_c = lstm ? to_compute(*c, compute) : Tensor();
  Tensor ws = workspace.contiguous();
  AT_DISPATCH_FLOATING_TYPES(compute, "fastrnn_cpu_cell_step_backward", [&] {
    BackwardStep<scalar_t> step{};
    step.hidden = H;
    step.out_size = H;
    step.seq_len = 1;
    step.t = 0;
    step.reverse = false;
    step.lengths = nullptr;
    step.grad_h = grad_h.data_ptr<scalar_t>();
    step.grad_h_row = H;
    step.grad_output = nullptr;
    step.grad_h_carry = grad_h.data_ptr<scalar_t>();
    step.grad_h_next = grad_h_direct.data_ptr<scalar_t>();
    step.grad_c = lstm ? grad_c.data_ptr<scalar_t>() : nullptr;
    step.workspace = ws.data_ptr<scalar_t>();
    step.workspace_row = info.workspace_gates * H;
    step.workspace_step = B * info.workspace_gates * H;
    step.c_initial = lstm ? c_c.data_ptr<scalar_t>() : nullptr;
    step.output = h_new_c.data_ptr<scalar_t>();
    step.output_row = H;
    step.output_step = B * H;
    step.h_initial = h_c.data_ptr<scalar_t>();
    step.grad_x_gates = grad_x_gates.data_ptr<scalar_t>();
    step.grad_x_gates_row = GH;
    step.grad_h_gates = gru ? grad_h_gates.data_ptr<scalar_t>() : nullptr;
    step.h_unprojected = nullptr;
    cell_pass(info.cell, step, B, H);
  });
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto as_input = [&](const Tensor& t) { return t.to(dtype); };
  const Tensor w_ih_c = to_compute(w_ih, compute).contiguous();
  const Tensor w_hh_c = to_compute(w_hh, compute).contiguous();
  const Tensor x_c = to_compute(x, compute);
  Tensor grad_x, grad_h_prev, grad_w_ih, grad_w_hh;
  if (compute == at::kFloat && use_packed_gemm<float>() && B <= kGemvBatch) {
    // products over the weights as they lie, each read once per batch row (see gemv_columns)
    const float* gx = grad_x_gates.data_ptr<float>();
    const float* gh = grad_h_gates.data_ptr<float>();
    const int64_t I = x.size(1);
    if (output_mask[0]) {
      grad_x = at::empty({B, I}, options);
      for (int64_t b = 0; b < B; ++b) {
        gemv_columns(GH, I, w_ih_c.data_ptr<float>(), I, gx + b * GH,
                     grad_x.data_ptr<float>() + b * I, false);
      }
    }
    if (output_mask[1]) {
      grad_h_prev = grad_h_direct;
      for (int64_t b = 0; b < B; ++b) {
        gemv_columns(GH, H, w_hh_c.data_ptr<float>(), H, gh + b * GH,
                     grad_h_prev.data_ptr<float>() + b * H, true);
      }
    }
    if (output_mask[3]) grad_w_ih = outer_sum(grad_x_gates, x_c);
    if (output_mask[4]) grad_w_hh = outer_sum(grad_h_gates, h_c);
  } else {
    if (output_mask[0]) grad_x = at::mm(grad_x_gates, w_ih_c);
    if (output_mask[1]) {  // the direct part is GRU's z dh; zero for the other cells
      grad_h_prev = gru ? at::addmm(grad_h_direct, grad_h_gates, w_hh_c)
                        : at::mm(grad_h_gates, w_hh_c);
    }
    // g^T a, contiguous: as fast as torch.nn's (a^T g)^T on one thread, 10-40% faster on two
    // (MKL, B 5-128, K 64-512, G*H 256-2048)
    if (output_mask[3]) grad_w_ih = at::mm(grad_x_gates.t(), x_c);
    if (output_mask[4]) grad_w_hh = at::mm(grad_h_gates.t(), h_c);
  }
  grad_x = output_mask[0] ? as_input(grad_x) : empty();
  grad_h_prev = output_mask[1] ? as_input(grad_h_prev) : empty();
  Tensor grad_c_prev = output_mask[2] && lstm ? as_input(grad_c) : empty();
  grad_w_ih = output_mask[3] ? as_input(grad_w_ih) : empty();
  grad_w_hh = output_mask[4] ? as_input(grad_w_hh) : empty();
  // b_ih and b_hh enter only as their sum except in a GRU (b_hn inside r * (W_hn h + b_hn))
  Tensor grad_b_ih = output_mask[5] ? as_input(grad_x_gates.sum(0)) : empty();
  Tensor grad_b_hh = !output_mask[6] ? empty()
      : (!gru && output_mask[5]) ? grad_b_ih.clone() : as_input(grad_h_gates.sum(0));
  return {grad_x, grad_h_prev, grad_c_prev, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace fastrnn_cpu
