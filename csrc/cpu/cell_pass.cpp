// The cell passes (cell_pass.h): the forward and backward of each cell on a segment of one batch
// row, in chunks of units whose gates stay in L1 between the sums, the activations
// (activations.h: as accurate as torch's own sigmoid and tanh) and the state update.

#include "cell_pass.h"

#include <algorithm>

#include "activations.h"
#include "kernel_attributes.h"

namespace fastrnn_cpu {
namespace {

// Loops marked ivdep write each column of distinct buffers once: no dependence between columns.

constexpr int64_t kChunk = 256;

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
      for (int64_t j = 0; j < m; ++j) a_g[j] = x_g[j] + (h_g[j] + b_g[j]);
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

}  // namespace

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

}  // namespace fastrnn_cpu
