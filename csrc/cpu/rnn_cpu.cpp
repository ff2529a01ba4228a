// Fused CPU recurrence for one layer (all directions) of an LSTM, GRU or Elman RNN, forward and
// backward (BPTT), following the contract of fastrnn/backends/base.py.
//
// Legend: B batch, T time, H hidden, P proj_size or H, G gates, D directions, W workspace width.
// The steps split over threads in one of two ways (row_groups). By groups of batch rows, where
// each thread gets a whole GEMM tile of rows (packed kernels): each thread runs its rows through
// every step with the whole W_hh, forward (h W_hh^T, then the cell) and backward (the cell pass,
// then grad h_prev = grad_gates W_hh), never waiting for another thread. Otherwise by blocks of
// hidden units: forward, each thread multiplies h by its own block of W_hh rows (a one-thread
// GEMM into a preallocated buffer) and runs the fused, vectorised cell on its block of units,
// then waits for the other threads' h; backward, a fused cell pass split by rows, then
// grad h_prev by blocks of columns. With layer_forward_from_input each thread also computes the
// step's x_gates of its rows or units (x_t W_ih^T) inside the time loop, unless W_ih is large.
// The backward ends with one GEMM per weight over all steps. Where the per-step products cannot
// throw (the packed kernels), a split by units is one OpenMP region with a barrier per step
// (parallel_steps.h).
// In float32 on AVX-512 or AVX2/FMA CPUs the per-step GEMMs run on packed_gemm.h, each thread's
// block of weights packed once per call; elsewhere on matmul.h. On AVX-512 CPUs the LSTM forward
// cell is written with intrinsics (divisions by a reciprocal estimate and one Newton step).
// bfloat16/float16 inputs run in float32 and are rounded on output; on CPUs with bfloat16 dot
// products (AVX512_BF16) the per-step GEMMs of a bfloat16 layer (and its grad W_hh) multiply in
// bfloat16, h and grad_gates rounded to bfloat16 for them as oneDNN does, and sum in float32.
// A single step of a cell (cell_step_forward / cell_step_backward, at the end of this file) is
// one call without any packing of the weights: the step reads them once, as they lie. cell_step
// is the two as one op with a native autograd node.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "activations.h"
#include "linear_cpu.h"
#include "matmul.h"
#include "packed_gemm.h"
#include "parallel_steps.h"

namespace fastrnn_cpu {
namespace {

using at::Tensor;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRNN_CLONES
#endif
#define FASTRNN_INLINE inline __attribute__((always_inline))
// Loops marked ivdep write each column of distinct buffers once: no dependence between columns.

enum class Cell { kLstm, kGru, kRnnTanh, kRnnRelu };

struct CellInfo {
  Cell cell;
  int64_t gates;            // G
  int64_t workspace_gates;  // W / H
};

CellInfo cell_info(std::string_view name) {
  if (name == "lstm") return {Cell::kLstm, 4, 5};
  if (name == "gru") return {Cell::kGru, 3, 4};
  if (name == "rnn_tanh") return {Cell::kRnnTanh, 1, 0};
  if (name == "rnn_relu") return {Cell::kRnnRelu, 1, 0};
  TORCH_CHECK(false, "fastrnn cpu: unknown cell ", name);
}

// Units per chunk of a cell pass: a chunk's gates stay in L1 between the sums, the activations
// (activations.h: torch's own sigmoid and tanh) and the state update.
constexpr int64_t kChunk = 256;

// What the cell pass of one forward step reads and writes; rows are batch entries. The recurrent
// term comes per block of hidden units: [B, G, units] for units first_unit .. first_unit+units-1.
// One per block, each written by the thread running the block: cache-line aligned, so that no two
// blocks share a line.
template <typename T>
struct alignas(64) ForwardStep {
  int64_t hidden;                // H
  int64_t t;                     // time step
  const int64_t* lengths;        // [B] or null
  const T* x_gates;              // [B, G, units] of this block: rows x_gates_row apart, gates
  int64_t x_gates_row;           //   x_gates_gate apart, unit j at j - x_gates_first
  int64_t x_gates_gate;          //   (the whole [B, G*H] rows: gate stride H, first unit 0)
  int64_t x_gates_first;
  const T* h_gates;              // [B, G, units] W_hh h of this block of units, contiguous
  int64_t units;
  int64_t first_unit;
  const T* bias;                 // [G*H] b_hh (zeros when the layer has none)
  T* workspace;                  // [B, W] rows workspace_row apart; null: no gates saved
  int64_t workspace_row;
  const T* h_prev;               // [B, P] h before the step
  T* h_next;                     // [B, P] h after the step; null when projecting
  T* c_state;                    // [B, H] LSTM c, updated in place
  T* output;                     // [B, P] rows output_row apart; written when nothing projects
  int64_t output_row;
  T* h_unprojected;              // [B, H] LSTM with projection: o * tanh(c); else null
};

// Hidden units [j0, j1) of row b of one forward step (inside the step's block of units); the
// gates are saved to the workspace when kSaveGates (a backward is to come).
template <bool kSaveGates, typename T>
FASTRNN_INLINE void forward_segment(Cell cell, const ForwardStep<T>& s, int64_t b, int64_t j0,
                                    int64_t j1) {
  const int64_t H = s.hidden, n = j1 - j0, U = s.units;
  const bool valid = s.lengths == nullptr || s.t < s.lengths[b];
  const bool projects = s.h_unprojected != nullptr;
  // Without projection P == H, so h rows are H apart.
  T* __restrict ws = kSaveGates ? s.workspace + b * s.workspace_row + j0 : nullptr;
  T* __restrict out = s.output + b * s.output_row + j0;
  const T* __restrict h = projects ? nullptr : s.h_prev + b * H + j0;
  T* __restrict h_next = projects ? nullptr : s.h_next + b * H + j0;
  if (!valid) {  // past the sequence's end: zeros out, the state stays
    const int64_t saved_gates = cell == Cell::kLstm ? 5 : (cell == Cell::kGru ? 4 : 0);
    for (int64_t k = 0; kSaveGates && k < saved_gates; ++k) {
      std::fill(ws + k * H, ws + k * H + n, T(0));
    }
    if (!projects) {
      std::fill(out, out + n, T(0));
      std::copy(h, h + n, h_next);
    }
    return;
  }
  const int64_t G = cell == Cell::kLstm ? 4 : (cell == Cell::kGru ? 3 : 1);
  const T* __restrict xg = s.x_gates + b * s.x_gates_row + (j0 - s.x_gates_first);
  const int64_t X = s.x_gates_gate;
  const T* __restrict hg = s.h_gates + b * G * U + (j0 - s.first_unit);
  const T* __restrict bias = s.bias + j0;
  if (cell == Cell::kRnnRelu) {
    #pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const T pre = xg[j] + hg[j] + bias[j];
      const T h_new = pre < T(0) ? T(0) : pre;  // NaN stays NaN, as in torch.relu
      h_next[j] = h_new;
      out[j] = h_new;
    }
    return;
  }
  for (int64_t first = 0; first < n; first += kChunk) {
    const int64_t m = std::min(kChunk, n - first);
    alignas(64) T a[5 * kChunk];  // per gate: its pre-activations, then the gate; then LSTM tanh(c)
    for (int64_t g = 0; g < G; ++g) {
      const T* __restrict x_g = xg + g * X + first;
      const T* __restrict h_g = hg + g * U + first;
      const T* __restrict b_g = bias + g * H + first;
      T* __restrict a_g = a + g * kChunk;
      #pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) a_g[j] = x_g[j] + h_g[j] + b_g[j];
    }
    const int64_t o0 = first;  // this chunk's offset within the segment
    switch (cell) {
      case Cell::kLstm: {
        T* __restrict c = s.c_state + b * H + j0 + o0;
        T* __restrict hu = (projects ? s.h_unprojected + b * H + j0 : h_next) + o0;
        T* __restrict i = a, * __restrict f = a + kChunk, * __restrict g = a + 2 * kChunk;
        T* __restrict o = a + 3 * kChunk, * __restrict tc = a + 4 * kChunk;
        sigmoid_inplace(i, m);
        sigmoid_inplace(f, m);
        tanh_inplace(g, m);
        sigmoid_inplace(o, m);
        #pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) {
          const T c_new = f[j] * c[j] + i[j] * g[j];
          c[j] = c_new;
          tc[j] = c_new;
        }
        if constexpr (kSaveGates) {
          for (int64_t k = 0; k < 4; ++k) std::copy(a + k * kChunk, a + k * kChunk + m, ws + k * H + o0);
          std::copy(c, c + m, ws + 4 * H + o0);
        }
        tanh_inplace(tc, m);
        #pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) hu[j] = o[j] * tc[j];
        if (!projects) std::copy(hu, hu + m, out + o0);
        break;
      }
      case Cell::kGru: {
        T* __restrict r = a, * __restrict z = a + kChunk, * __restrict n_gate = a + 2 * kChunk;
        T* __restrict hn = a + 3 * kChunk;
        sigmoid_inplace(r, m);
        sigmoid_inplace(z, m);
        const T* __restrict x_n = xg + 2 * X + o0;
        const T* __restrict h_n = hg + 2 * U + o0;
        const T* __restrict b_n = bias + 2 * H + o0;
        #pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) {
          hn[j] = h_n[j] + b_n[j];
          n_gate[j] = x_n[j] + r[j] * hn[j];
        }
        tanh_inplace(n_gate, m);
        if constexpr (kSaveGates) {
          for (int64_t k = 0; k < 4; ++k) std::copy(a + k * kChunk, a + k * kChunk + m, ws + k * H + o0);
        }
        const T* __restrict h_old = h + o0;
        #pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) {
          const T h_new = n_gate[j] + z[j] * (h_old[j] - n_gate[j]);
          h_next[o0 + j] = h_new;
          out[o0 + j] = h_new;
        }
        break;
      }
      case Cell::kRnnTanh:
      case Cell::kRnnRelu:
        tanh_inplace(a, m);
        std::copy(a, a + m, h_next + o0);
        std::copy(a, a + m, out + o0);
        break;
    }
  }
}

// What the cell pass of one backward step reads and writes.
template <typename T>
struct BackwardStep {
  int64_t hidden;                // H
  int64_t out_size;              // P
  int64_t seq_len;               // T
  int64_t t;
  bool reverse;                  // direction 1
  const int64_t* lengths;        // [B] or null
  const T* grad_h;               // [B, H] gradient of the step's unprojected h, rows grad_h_row apart
  int64_t grad_h_row;
  const T* grad_output;          // [B, P] rows grad_output_row apart, added to grad_h; or null
  int64_t grad_output_row;
  const T* grad_h_carry;         // [B, P] gradient of h after the step (carried at padded steps)
  T* grad_h_next;                // [B, P] out: the part of grad h_prev not through W_hh
  T* grad_c;                     // [B, H] LSTM, in: after the step, out: before it
  const T* workspace;            // [T, B, W] of this direction, rows workspace_row apart
  int64_t workspace_row;
  int64_t workspace_step;
  const T* c_initial;            // [B, H] LSTM c0
  const T* output;               // [T, B, P] h of this direction, rows output_row apart
  int64_t output_row;
  int64_t output_step;
  const T* h_initial;            // [B, P] h0
  T* grad_x_gates;               // [B, G*H] rows grad_x_gates_row apart
  int64_t grad_x_gates_row;
  T* grad_h_gates;               // [B, G*H] GRU (differs from grad_x_gates in n), contiguous
  T* h_unprojected;              // [B, H] LSTM with projection: o * tanh(c) (0 when padded)
};

template <typename T>
FASTRNN_INLINE void backward_segment(Cell cell, const BackwardStep<T>& s, int64_t b, int64_t j0,
                                     int64_t j1) {
  const int64_t H = s.hidden;
  const int64_t G = cell == Cell::kLstm ? 4 : (cell == Cell::kGru ? 3 : 1);
  const int64_t length = s.lengths == nullptr ? s.seq_len : s.lengths[b];
  T* __restrict gx = s.grad_x_gates + b * s.grad_x_gates_row;
  T* __restrict gh_next = s.grad_h_next + b * s.out_size;
  if (s.t >= length) {  // padded step: no gradient flows into it, the carried ones pass by
    for (int64_t k = 0; k < G; ++k) std::fill(gx + k * H + j0, gx + k * H + j1, T(0));
    if (cell == Cell::kGru) {
      T* gh = s.grad_h_gates + b * G * H;
      for (int64_t k = 0; k < G; ++k) std::fill(gh + k * H + j0, gh + k * H + j1, T(0));
    }
    if (s.h_unprojected != nullptr) std::fill(s.h_unprojected + b * H + j0, s.h_unprojected + b * H + j1, T(0));
    // grad_h_next has P columns; segments cover H columns, so the row is copied by its first
    // segment (P <= H) when it is a projected LSTM.
    if (s.h_unprojected == nullptr) {
      std::copy(s.grad_h_carry + b * s.out_size + j0, s.grad_h_carry + b * s.out_size + j1, gh_next + j0);
    } else if (j0 == 0) {
      std::copy(s.grad_h_carry + b * s.out_size, s.grad_h_carry + (b + 1) * s.out_size, gh_next);
    }
    return;
  }
  const bool prev_is_initial = s.reverse ? s.t + 1 >= length : s.t == 0;
  const int64_t prev_t = s.reverse ? s.t + 1 : s.t - 1;
  const T* __restrict gh_in = s.grad_h + b * s.grad_h_row;
  const T* __restrict go = s.grad_output == nullptr ? nullptr : s.grad_output + b * s.grad_output_row;
  const T* __restrict ws = s.workspace + s.t * s.workspace_step + b * s.workspace_row;
  switch (cell) {
    case Cell::kLstm: {
      T* __restrict dc = s.grad_c + b * H;
      const T* __restrict c_prev = prev_is_initial
          ? s.c_initial + b * H
          : s.workspace + prev_t * s.workspace_step + b * s.workspace_row + 4 * H;
      T* __restrict hu = s.h_unprojected == nullptr ? nullptr : s.h_unprojected + b * H;
      for (int64_t first = j0; first < j1; first += kChunk) {
        const int64_t m = std::min(kChunk, j1 - first);
        alignas(64) T tanh_c[kChunk];  // tanh(c) of this chunk
        std::copy(ws + 4 * H + first, ws + 4 * H + first + m, tanh_c);
        tanh_inplace(tanh_c, m);
        #pragma GCC ivdep
        for (int64_t k = 0; k < m; ++k) {
          const int64_t j = first + k;
          const T dh = go == nullptr ? gh_in[j] : gh_in[j] + go[j];
          const T i = ws[j], f = ws[H + j], g = ws[2 * H + j], o = ws[3 * H + j];
          const T tc = tanh_c[k];
          const T dcv = dc[j] + dh * o * (T(1) - tc * tc);
          gx[j] = dcv * g * i * (T(1) - i);
          gx[H + j] = dcv * c_prev[j] * f * (T(1) - f);
          gx[2 * H + j] = dcv * i * (T(1) - g * g);
          gx[3 * H + j] = dh * tc * o * (T(1) - o);
          dc[j] = dcv * f;
        }
        if (hu != nullptr) {
          #pragma GCC ivdep
          for (int64_t k = 0; k < m; ++k) hu[first + k] = ws[3 * H + first + k] * tanh_c[k];
        }
      }
      if (hu != nullptr) {
        if (j0 == 0) std::fill(gh_next, gh_next + s.out_size, T(0));
      } else {
        std::fill(gh_next + j0, gh_next + j1, T(0));
      }
      break;
    }
    case Cell::kGru: {
      T* __restrict gh = s.grad_h_gates + b * G * H;
      const T* __restrict h_prev = prev_is_initial
          ? s.h_initial + b * H
          : s.output + prev_t * s.output_step + b * s.output_row;
      #pragma GCC ivdep
      for (int64_t j = j0; j < j1; ++j) {
        const T dh = go == nullptr ? gh_in[j] : gh_in[j] + go[j];
        const T r = ws[j], z = ws[H + j], n = ws[2 * H + j], hn = ws[3 * H + j];
        const T dn = dh * (T(1) - z) * (T(1) - n * n);
        const T dr = dn * hn * r * (T(1) - r);
        const T dz = dh * (h_prev[j] - n) * z * (T(1) - z);
        gx[j] = dr;
        gx[H + j] = dz;
        gx[2 * H + j] = dn;
        gh[j] = dr;
        gh[H + j] = dz;
        gh[2 * H + j] = dn * r;
        gh_next[j] = dh * z;
      }
      break;
    }
    case Cell::kRnnTanh:
    case Cell::kRnnRelu: {
      const T* __restrict h_new = s.output + s.t * s.output_step + b * s.output_row;
      #pragma GCC ivdep
      for (int64_t j = j0; j < j1; ++j) {
        const T dh = go == nullptr ? gh_in[j] : gh_in[j] + go[j];
        gx[j] = cell == Cell::kRnnTanh ? dh * (T(1) - h_new[j] * h_new[j])
                                       : (h_new[j] <= T(0) ? T(0) : dh);  // NaN passes
        gh_next[j] = T(0);
      }
      break;
    }
  }
}

// The forward cell pass; the gates are saved where the step has a workspace.
FASTRNN_CLONES void forward_segment_f32(Cell cell, const ForwardStep<float>& s, int64_t b,
                                        int64_t j0, int64_t j1) {
  if (s.workspace != nullptr) {
    forward_segment<true>(cell, s, b, j0, j1);
  } else {
    forward_segment<false>(cell, s, b, j0, j1);
  }
}
void forward_segment_f64(Cell cell, const ForwardStep<double>& s, int64_t b, int64_t j0,
                         int64_t j1) {
  if (s.workspace != nullptr) {
    forward_segment<true>(cell, s, b, j0, j1);
  } else {
    forward_segment<false>(cell, s, b, j0, j1);
  }
}
FASTRNN_CLONES void backward_segment_f32(Cell cell, const BackwardStep<float>& s, int64_t b,
                                         int64_t j0, int64_t j1) {
  backward_segment(cell, s, b, j0, j1);
}
void backward_segment_f64(Cell cell, const BackwardStep<double>& s, int64_t b, int64_t j0,
                          int64_t j1) {
  backward_segment(cell, s, b, j0, j1);
}

void run_segment(Cell cell, const ForwardStep<float>& s, int64_t b, int64_t j0, int64_t j1) {
  forward_segment_f32(cell, s, b, j0, j1);
}
void run_segment(Cell cell, const ForwardStep<double>& s, int64_t b, int64_t j0, int64_t j1) {
  forward_segment_f64(cell, s, b, j0, j1);
}
void run_segment(Cell cell, const BackwardStep<float>& s, int64_t b, int64_t j0, int64_t j1) {
  backward_segment_f32(cell, s, b, j0, j1);
}
void run_segment(Cell cell, const BackwardStep<double>& s, int64_t b, int64_t j0, int64_t j1) {
  backward_segment_f64(cell, s, b, j0, j1);
}

// Elements of B*H below which a backward cell pass stays on one thread.
constexpr int64_t kCellGrain = 2048;

// Asks for the step's x_gates of its block of units, rows [first_row, last_row), to be brought
// into cache, so that the cell pass does not wait on them.
template <typename T>
void prefetch_gate_inputs(const ForwardStep<T>& s, int64_t first_row, int64_t last_row,
                          int64_t gates) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t b = first_row; b < last_row; ++b) {
    for (int64_t g = 0; g < gates; ++g) {
      const T* begin = s.x_gates + b * s.x_gates_row + g * s.hidden + s.first_unit;
      for (int64_t j = 0; j < s.units; j += kLine) __builtin_prefetch(begin + j);
    }
  }
}

// One backward cell pass over every (row, hidden unit), split over threads in row segments.
template <typename Step>
void cell_pass(Cell cell, const Step& step, int64_t batch, int64_t hidden) {
  parallel_for(0, batch * hidden, kCellGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin / hidden; b * hidden < end; ++b) {
      const int64_t j0 = std::max(begin - b * hidden, int64_t(0));
      const int64_t j1 = std::min(end - b * hidden, hidden);
      run_segment(cell, step, b, j0, j1);
    }
  });
}

// lengths as a contiguous CPU int64 tensor (undefined when absent), checked against T and B.
Tensor checked_lengths(const std::optional<Tensor>& lengths, int64_t seq_len, int64_t batch) {
  if (!lengths.has_value()) return Tensor();
  TORCH_CHECK(lengths->device().is_cpu() && lengths->scalar_type() == at::kLong &&
                  lengths->dim() == 1 && lengths->size(0) == batch,
              "fastrnn cpu: lengths must be a CPU int64 tensor of shape [B]");
  Tensor result = lengths->contiguous();
  const int64_t* data = result.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(data[b] >= 1 && data[b] <= seq_len, "fastrnn cpu: lengths must lie in [1, T]");
  }
  return result;
}

const int64_t* lengths_data(const Tensor& lengths) {
  return lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
}

// Hidden units (or columns of h) per block of a step: one block per thread, each with its own
// rows (forward) or columns (backward) of W_hh and a one-thread GEMM; one-thread GEMMs on blocks
// scale better over the threads than one small GEMM split by the BLAS library.
int64_t units_per_block(int64_t hidden) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), hidden / 64));
  const int64_t units = (hidden + blocks - 1) / blocks;
  return blocks == 1 ? hidden : (units + 15) / 16 * 16;
}

// Batch rows per thread from which the steps of a layer split by rows (row_groups): a whole
// GEMM tile of rows (packed_gemm.h: 8 on AVX-512; AVX2's 6-row tiles need 12 to stay full, as
// 8 rows run as two tiles of 4, a sixth slower).
int64_t rows_per_group() { return avx512_kernels() ? 8 : 12; }

// Groups of batch rows that the steps of a layer split into over threads: each thread runs its
// rows through every step with the whole of W_hh (the rows of an RNN never meet), with no
// barrier between steps. 1 where the steps split by blocks of hidden units instead
// (units_per_block): too few rows per thread, or blocks of units keep more threads busy.
// FASTRNN_CPU_SPLIT=units or rows (read at each call) forces one split, to test or compare.
int64_t row_groups(int64_t batch, int64_t unit_blocks) {
  const char* forced = std::getenv("FASTRNN_CPU_SPLIT");
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::min<int64_t>(threads, batch / rows_per_group());
  if (forced != nullptr && std::strcmp(forced, "units") == 0) groups = 1;
  if (forced != nullptr && std::strcmp(forced, "rows") == 0) {
    groups = std::min<int64_t>(threads, batch);
    unit_blocks = 1;
  }
  return groups >= 2 && groups >= unit_blocks ? groups : 1;
}

// Packs the blocks [0, blocks) of a layer's weights: reset(k) makes room for block k,
// pack(k, p0, p1) fills its panels [p0, p1), panels(k) counts them. The one block of a split by
// rows, used by every thread, is packed by all of them, panel by panel; else each block by the
// thread that will use it.
template <typename Reset, typename Pack, typename Panels>
void pack_blocks(int64_t blocks, bool split_by_rows, const Reset& reset, const Pack& pack,
                 const Panels& panels) {
  if (split_by_rows) {
    reset(0);
    parallel_for(0, panels(0), 1, [&](int64_t begin, int64_t end) { pack(0, begin, end); });
    return;
  }
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      reset(k);
      pack(k, 0, panels(k));
    }
  });
}

// Runs rows(r0, r1) for each of the groups of batch rows [r0, r1) of row_groups, one thread per
// group.
template <typename Rows>
void for_each_row_group(int64_t batch, int64_t groups, const Rows& rows) {
  parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      rows(group * batch / groups, (group + 1) * batch / groups);
    }
  });
}

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

at::ScalarType compute_type(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;
}

Tensor to_compute(const Tensor& t, at::ScalarType compute) {
  return t.defined() ? t.to(compute).contiguous() : t;
}

Tensor value_or_undefined(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

// One layer forward for x_gates [T, B, D*G*H], or, with a projection, for its x [T, B, I].
std::tuple<Tensor, Tensor, Tensor, Tensor> run_forward(
    const CellInfo& info, const Tensor& x_gates, const InputProjection* projection,
    const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace) {
  const Tensor& rows = projection != nullptr ? projection->x : x_gates;  // [T, B, ...]
  const auto dtype = rows.scalar_type();
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

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    std::string_view cell, const Tensor& x_gates, const Tensor& h0, const std::optional<Tensor>& c0,
    const Tensor& w_hh, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool keep_workspace) {
  return run_forward(cell_info(cell), x_gates, nullptr, h0, c0, w_hh, b_hh, w_hr, lengths,
                     keep_workspace);
}

// Bytes of W_ih per direction above which a float32 layer's input projection runs as one GEMM
// over all steps (linear) before the recurrence instead of step by step inside it: inside, every
// step streams W_ih through the caches again (measured on a 2-core Zen 4: at 1 MiB, B16 H256,
// step by step is faster; at 4 MiB, B64 H512, one GEMM is).
constexpr int64_t kFusedProjectionMaxBytes = int64_t(2) << 20;

// One layer forward from its input x [T, B, I]: the input projection runs step by step inside the
// recurrence (x_gates are never stored whole) for float32 where packed_gemm runs and W_ih is not
// large, each x_gates entry is computed as linear() computes it, so the results are those of
// linear() then layer_forward(); and for bfloat16 on AVX512_BF16 CPUs, with x_gates kept in
// float32 where linear() rounds them to bfloat16. Otherwise linear() runs before the recurrence.
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
  // float32: fused unless W_ih is large, where one GEMM over all steps reads it once instead of
  // once per step; bfloat16: always fused (its x_gates then stay in float32).
  const bool large_w_ih =
      w_ih.numel() * int64_t(sizeof(float)) > kFusedProjectionMaxBytes * w_hh.size(0);
  const bool packed = all_of(at::kFloat) && use_packed_gemm<float>() && !large_w_ih;
  const bool bf16 = all_of(at::kBFloat16) && packed_gemm_bf16_supported();
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
                       keep_workspace);
  }
  return run_forward(info, fastrnn_cpu::linear(x, w_ih, b_ih), nullptr, h0, c0, w_hh, b_hh, w_hr,
                     lengths, keep_workspace);
}

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
    for (int64_t b = 0; b < batch; ++b) {
      gemv_rows(count, depth, w + first * depth, depth, a + b * depth, out + b * ldo + first,
                bias == nullptr ? nullptr : bias + first);
    }
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
// when defined, workspace [B, W].
void step_forward_f32(const CellInfo& info, const Tensor& x, const Tensor& h, const Tensor& c,
                      const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                      const Tensor& b_hh, Tensor& h_new, Tensor& c_new, Tensor& workspace) {
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
    at::mm_out(h_gates_t, h, w_hh.t());
  } else if (!gemv) {
    x_t.pack(x.data_ptr<float>(), I, B, 1, I);
    h_t.pack(h.data_ptr<float>(), H, B, 1, H);
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
      step_product(B, h.data_ptr<float>(), H, h_t, w_hh.data_ptr<float>(), nullptr, first,
                   j1 - j0, h_gates, GH, scratch + GH * B + first * B);
    }
    for (int64_t b = 0; b < B; ++b) run_segment(info.cell, step, b, j0, j1);
  });
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

// (h_new [B, H], c_new [B, H] or [0], workspace [B, W] or [0, W]): one step of cell `cell`, see
// above; the workspace is what cell_step_backward needs (keep_workspace), in the layout of a
// layer's workspace at T = 1, D = 1.
std::tuple<Tensor, Tensor, Tensor> cell_step_forward(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, bool keep_workspace) {
  const at::NoGradGuard no_grad;  // the op is differentiated by its callers (ops._EagerStep)
  const CellInfo info = cell_info(cell);
  const bool lstm = info.cell == Cell::kLstm;
  const int64_t B = x.size(0), H = h.size(1), GH = info.gates * H;
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && h.size(0) == B && w_ih.dim() == 2 &&
                  w_hh.dim() == 2 && w_ih.size(0) == GH && w_ih.size(1) == x.size(1) &&
                  w_hh.size(0) == GH && w_hh.size(1) == H && (!lstm || c.has_value()),
              "fastrnn cpu: cell step shapes do not match");
  const auto options = x.options();
  const int64_t W = info.workspace_gates * H;
  Tensor h_new = at::empty({B, H}, options);
  Tensor c_new = lstm ? at::empty({B, H}, options) : at::empty({0}, options);
  Tensor workspace = keep_workspace ? at::empty({B, W}, options) : at::empty({0, W}, options);
  const bool direct = x.scalar_type() == at::kFloat && use_packed_gemm<float>() &&
                      h.scalar_type() == at::kFloat && w_ih.scalar_type() == at::kFloat &&
                      w_hh.scalar_type() == at::kFloat && B > 0 && H > 0 && x.size(1) > 0;
  if (direct) {
    Tensor ws = keep_workspace ? workspace : Tensor();
    step_forward_f32(info, x.contiguous(), h.contiguous(),
                     lstm ? c->contiguous().to(at::kFloat) : Tensor(), w_ih.contiguous(),
                     w_hh.contiguous(), to_compute(value_or_undefined(b_ih), at::kFloat),
                     to_compute(value_or_undefined(b_hh), at::kFloat), h_new, c_new, ws);
    return {h_new, c_new, workspace};
  }
  // elsewhere: the layer kernel at T = 1
  auto [output, h_n, c_n, layer_workspace] = layer_forward_from_input(
      cell, x.unsqueeze(0), w_ih, b_ih, h.unsqueeze(0),
      lstm ? std::optional<Tensor>(c->unsqueeze(0)) : std::nullopt, w_hh.unsqueeze(0),
      b_hh.has_value() ? std::optional<Tensor>(b_hh->unsqueeze(0)) : std::nullopt, std::nullopt,
      std::nullopt, keep_workspace);
  h_new.copy_(h_n[0]);
  if (lstm) c_new.copy_(c_n[0]);
  if (keep_workspace) workspace.copy_(layer_workspace.view({B, W}));
  return {h_new, c_new, workspace};
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

// ---- a step as one autograd node (cell_step) -----------------------------------------------
// cell_step is cell_step_forward differentiated by a C++ node whose backward is
// cell_step_backward: an eager step loop pays no Python in its autograd graph. Where that
// backward must itself be differentiated (create_graph) or batched (vmap over the gradients),
// the node recomputes the step in torch's differentiable cell ops and differentiates those.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using StepForwardFn = decltype(cell_step_forward);
using StepBackwardFn = decltype(cell_step_backward);

// The registered ops, called through the dispatcher so that profilers see them.
const c10::TypedOperatorHandle<StepForwardFn>& step_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn_cpu::cell_step_forward", "")
                             .typed<StepForwardFn>();
  return op;
}

const c10::TypedOperatorHandle<StepBackwardFn>& step_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn_cpu::cell_step_backward", "")
                             .typed<StepBackwardFn>();
  return op;
}

std::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// Whether the native backward takes this gradient: undefined, or a strided tensor without a
// vmap (legacy or functorch) or functorch wrapper or a Python subclass around it.
bool plain_gradient(const Tensor& grad) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Batched,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Python});
  return !grad.defined() ||
         (grad.layout() == at::kStrided && !grad.key_set().has_any(wrapped));
}

// The gradients (7, in the inputs' order; undefined where !mask) of one step for grad_h and
// grad_c (undefined: unused), by recomputing it in torch's cell ops: the result carries a graph
// under create_graph (grad mode on) and batches under vmap.
std::array<Tensor, 7> step_vjp_by_recompute(Cell cell, const variable_list& saved,
                                            const Tensor& grad_h, const Tensor& grad_c,
                                            const std::array<bool, 7>& mask) {
  const bool create_graph = at::GradMode::is_enabled();
  const Tensor &x = saved[0], &h = saved[1], &c = saved[2], &w_ih = saved[3], &w_hh = saved[4];
  const auto b_ih = optional_of(saved[5]), b_hh = optional_of(saved[6]);
  Tensor h_new, c_new;
  {
    const at::AutoGradMode enable_grad(true);
    switch (cell) {
      case Cell::kLstm:
        std::tie(h_new, c_new) = at::lstm_cell(x, {h, c}, w_ih, w_hh, b_ih, b_hh);
        break;
      case Cell::kGru: h_new = at::gru_cell(x, h, w_ih, w_hh, b_ih, b_hh); break;
      case Cell::kRnnTanh: h_new = at::rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh); break;
      case Cell::kRnnRelu: h_new = at::rnn_relu_cell(x, h, w_ih, w_hh, b_ih, b_hh); break;
    }
  }
  variable_list outputs, grad_outputs, inputs;
  if (grad_h.defined()) {
    outputs.push_back(h_new);
    grad_outputs.push_back(grad_h);
  }
  if (grad_c.defined()) {
    outputs.push_back(c_new);
    grad_outputs.push_back(grad_c);
  }
  for (size_t i = 0; i < 7; ++i) {
    if (mask[i]) inputs.push_back(saved[i]);
  }
  std::array<Tensor, 7> grads;
  if (outputs.empty() || inputs.empty()) return grads;
  const variable_list found = torch::autograd::grad(outputs, inputs, grad_outputs, create_graph,
                                                    create_graph, /*allow_unused=*/true);
  for (size_t i = 0, next = 0; i < 7; ++i) {
    if (mask[i]) grads[i] = found[next++];
  }
  return grads;
}

class CellStep : public torch::autograd::Function<CellStep> {
 public:
  // (h_new, c_new, workspace) of cell_step_forward; c_new (but for an LSTM) and the workspace
  // are not differentiable
  static variable_list forward(AutogradContext* ctx, std::string_view cell, const Tensor& x,
                               const Tensor& h, const std::optional<Tensor>& c,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h_new, c_new, workspace] =
        step_forward_op().call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, true);
    ctx->save_for_backward({x, h, value_or_undefined(c), w_ih, w_hh, value_or_undefined(b_ih),
                            value_or_undefined(b_hh), h_new, workspace});
    ctx->saved_data["cell"] = std::string(cell);
    if (cell_info(cell).cell == Cell::kLstm) {
      ctx->mark_non_differentiable({workspace});
    } else {
      ctx->mark_non_differentiable({c_new, workspace});
    }
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    return {h_new, c_new, workspace};
  }

  // one gradient per argument of forward: none for the cell's name
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::string& name = ctx->saved_data["cell"].toStringRef();
    const Cell cell = cell_info(name).cell;
    const Tensor& grad_h = grad_outputs[0];
    const Tensor grad_c = cell == Cell::kLstm ? grad_outputs[1] : Tensor();
    std::array<bool, 7> mask{};  // x, h, c, w_ih, w_hh, b_ih, b_hh; absent ones have no edge
    for (size_t i = 0, edge = 0; i < 7; ++i) {
      if (saved[i].defined()) mask[i] = ctx->needs_input_grad(edge++);
    }
    std::array<Tensor, 7> grads;
    const bool transformed =
        c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
    if (at::GradMode::is_enabled() || transformed || !plain_gradient(grad_h) ||
        !plain_gradient(grad_c)) {
      grads = step_vjp_by_recompute(cell, saved, grad_h, grad_c, mask);
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto found = step_backward_op().call(name, optional_of(grad_h), optional_of(grad_c),
                                           saved[0], saved[1], optional_of(saved[2]), saved[3],
                                           saved[4], saved[7], saved[8], mask);
      grads = {std::get<0>(found), std::get<1>(found), std::get<2>(found), std::get<3>(found),
               std::get<4>(found), std::get<5>(found), std::get<6>(found)};
    }
    variable_list result{Tensor()};
    for (size_t i = 0; i < 7; ++i) result.push_back(mask[i] ? grads[i] : Tensor());
    return result;
  }
};

// cell_step where autograd records: a CellStep node when a graph is built, else the forward
// without a workspace.
std::tuple<Tensor, Tensor, Tensor> cell_step_autograd(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh) {
  const auto requires_grad = [](const std::optional<Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || h.requires_grad() || requires_grad(c) || w_ih.requires_grad() ||
        w_hh.requires_grad() || requires_grad(b_ih) || requires_grad(b_hh))) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return step_forward_op().call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, false);
  }
  const variable_list out = CellStep::apply(cell, x, h, c, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2]};
}

// cell_step below autograd (inference mode): the forward without a workspace.
std::tuple<Tensor, Tensor, Tensor> cell_step(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh) {
  return step_forward_op().call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, false);
}

}  // namespace
}  // namespace fastrnn_cpu

TORCH_LIBRARY(fastrnn_cpu, m) {
  m.def("layer_forward(str cell, Tensor x_gates, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
        "Tensor? w_hr, Tensor? lengths, bool keep_workspace) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_forward_from_input(str cell, Tensor x, Tensor w_ih, Tensor? b_ih, Tensor h0, "
        "Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, "
        "bool keep_workspace) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_backward(str cell, Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
        "Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor output, "
        "Tensor workspace) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cell_step_forward(str cell, Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, bool keep_workspace) -> (Tensor, Tensor, Tensor)");
  m.def("cell_step_backward(str cell, Tensor? grad_h_new, Tensor? grad_c_new, Tensor x, "
        "Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor h_new, Tensor workspace, "
        "bool[7] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cell_step(str cell, Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) {
  m.impl("layer_forward", &fastrnn_cpu::layer_forward);
  m.impl("layer_forward_from_input", &fastrnn_cpu::layer_forward_from_input);
  m.impl("layer_backward", &fastrnn_cpu::layer_backward);
  m.impl("cell_step_forward", &fastrnn_cpu::cell_step_forward);
  m.impl("cell_step_backward", &fastrnn_cpu::cell_step_backward);
  m.impl("cell_step", &fastrnn_cpu::cell_step);
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, Autograd, m) {
  m.impl("cell_step", &fastrnn_cpu::cell_step_autograd);
}
