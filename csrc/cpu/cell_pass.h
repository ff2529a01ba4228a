// The cell pass of a step: what one step does after its products, per batch row and block of
// hidden units, forward (the gates, the new c and h) and backward (the gradients of the gates,
// of c and of the part of h that does not pass through W_hh). Legend as in rnn_cpu.cpp.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string_view>

#include "parallel_steps.h"

namespace fastrnn_cpu {

enum class Cell { kLstm, kGru, kRnnTanh, kRnnRelu };

struct CellInfo {
  Cell cell;
  int64_t gates;            // G
  int64_t workspace_gates;  // W / H
};

inline CellInfo cell_info(std::string_view name) {
  if (name == "lstm") return {Cell::kLstm, 4, 5};
  if (name == "gru") return {Cell::kGru, 3, 4};
  if (name == "rnn_tanh") return {Cell::kRnnTanh, 1, 0};
  if (name == "rnn_relu") return {Cell::kRnnRelu, 1, 0};
  TORCH_CHECK(false, "fastrnn cpu: unknown cell ", name);
}

// Units per chunk of a cell pass: a chunk's gates stay in L1 between the sums, the activations

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


// Row b, hidden units [j0, j1) of one step's cell pass (a block's units, or a backward's row
// segment); the float32 passes run the fastest code this CPU has.
void run_segment(Cell cell, const ForwardStep<float>& s, int64_t b, int64_t j0, int64_t j1);
void run_segment(Cell cell, const ForwardStep<double>& s, int64_t b, int64_t j0, int64_t j1);
void run_segment(Cell cell, const BackwardStep<float>& s, int64_t b, int64_t j0, int64_t j1);
void run_segment(Cell cell, const BackwardStep<double>& s, int64_t b, int64_t j0, int64_t j1);

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


}  // namespace fastrnn_cpu
