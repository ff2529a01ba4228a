// Fused CPU recurrence for one layer (all directions) of an LSTM, GRU or Elman RNN, forward and
// backward (BPTT), following the contract of fastrnn/backends/base.py: the ops' registration.
//
// Legend: B batch, T time, H hidden, P proj_size or H, G gates, D directions, W workspace width.
// The steps split over threads in one of two ways (layer_plan.h: row_groups). By groups of batch
// rows, where each thread gets a whole GEMM tile of rows (packed kernels): each thread runs its
// rows through every step with the whole W_hh, forward (h W_hh^T, then the cell) and backward
// (the cell pass, then grad h_prev = grad_gates W_hh), never waiting for another thread.
// Otherwise by blocks of hidden units: forward, each thread multiplies h by its own block of W_hh
// rows (a one-thread GEMM into a preallocated buffer) and runs the cell on its block of units,
// then waits for the other threads' h; backward, a cell pass split by rows, then grad h_prev by
// blocks of columns. With layer_forward_from_input each thread also computes the step's x_gates
// of its rows or units (x_t W_ih^T) inside the time loop, unless W_ih is large. The backward ends
// with one GEMM per weight over all steps. Where the per-step products cannot throw (the packed
// kernels), a split by units is one OpenMP region with a barrier per step (parallel_steps.h).
// In float32 on AVX-512 or AVX2/FMA CPUs the per-step GEMMs run on packed_gemm.h, each thread's
// block of weights packed once per call; elsewhere on matmul.h. bfloat16/float16 inputs run in
// float32 and are rounded on output; on CPUs with bfloat16 dot products (AVX512_BF16) the
// per-step GEMMs of a bfloat16 layer (and its grad W_hh) multiply in bfloat16, h and grad_gates
// rounded to bfloat16 for them as oneDNN does, and sum in float32.
// A single step of a cell (step.cpp) is one call without any packing of the weights: the step
// reads them once, as they lie; cell_step is it as one op with a native autograd node
// (step_autograd.cpp).
//
// Inference with int8 weights (layer_forward_int8): the same time loop, its products on int8
// dot products (int8_gemm), the cell pass in float32.
//
// Files: cell_pass (the cells on a segment of units), activations, layer_plan (the split over
// threads), layer_forward, layer_forward_int8, layer_backward, step, step_autograd; the products
// in packed_gemm, int8_gemm, linear_cpu and matmul; rnn_ops.h declares the ops; direct_calls
// binds three of them as Python functions that skip the dispatcher where a call allows.

#include <torch/library.h>

#include "int8_gemm.h"
#include "rnn_ops.h"

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
  m.def("layer_step(str cell, Tensor input, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, bool batch_first) -> Tensor[]");
  m.def("layer_forward_int8(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor[] weights, "
        "bool has_biases, Tensor? lengths) -> (Tensor, Tensor, Tensor)");
  m.def("int8_kernels() -> str", [] { return std::string(fastrnn_cpu::int8_kernels()); });
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) {
  m.impl("layer_forward", &fastrnn_cpu::layer_forward);
  m.impl("layer_forward_from_input", &fastrnn_cpu::layer_forward_from_input);
  m.impl("layer_backward", &fastrnn_cpu::layer_backward);
  m.impl("cell_step_forward", &fastrnn_cpu::cell_step_forward);
  m.impl("cell_step_backward", &fastrnn_cpu::cell_step_backward);
  m.impl("cell_step", &fastrnn_cpu::cell_step);
  m.impl("layer_step", &fastrnn_cpu::layer_step);
  m.impl("layer_forward_int8", &fastrnn_cpu::layer_forward_int8);
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, Autograd, m) {
  m.impl("cell_step", &fastrnn_cpu::cell_step_autograd);
}
