// Framework-free launchers of the fastrnn CUDA backend: one recurrent layer, all directions.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates
// (LSTM 4, GRU 3, RNN 1), D directions (1 or 2), W workspace gates (LSTM 5, GRU 4, RNN 0).
// All pointers are device pointers. "T-typed" means the layer dtype (float, __half or
// __nv_bfloat16, see FastrnnDtype); state, workspace and gradient scratch are float.
// Every array is contiguous unless strides are given. Gate order is torch.nn's.
// Padded: a trailing dimension written K+ is K rounded up to kFastrnnPad elements, and its padding
// holds zeros (weights: the caller pads them; exchanged vectors: zeroed by the caller, never
// written by the kernels), so the kernels copy and read every row in 16-byte vectors.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

enum FastrnnCell { kFastrnnLstm = 0, kFastrnnGru = 1, kFastrnnRnnTanh = 2, kFastrnnRnnRelu = 3 };
enum FastrnnDtype { kFastrnnFloat32 = 0, kFastrnnFloat16 = 1, kFastrnnBFloat16 = 2 };

// Largest H and P the launchers accept; the device must also hold one float row of
// max(G*H, P) in shared memory.
constexpr int kFastrnnMaxSize = 8192;
constexpr int kFastrnnPad = 8;

// How a layer runs (chosen by the caller, fastrnn/backends/cuda_plan.py).
enum FastrnnPath {
  kFastrnnResident = 0,  // one cooperative launch; each block keeps its weight rows in shared memory
  kFastrnnStreamed = 1,  // one cooperative launch; weight rows re-read from global memory (L2)
  kFastrnnStepwise = 2,  // one ordinary launch per step and phase; weights from global memory
};

// Work split and shared-memory layout of one pass. The batch is split into `groups` groups of
// ceil(B / groups) rows; block (d, g, i) of the grid [D * groups * blocks] owns, for the rows of
// group g only, hidden units i*units .. +units (all their gates) and projection outputs
// i*outputs .. +outputs, so each block copies only its group's rows of an exchanged vector.
// Each step and phase runs over batch tiles of tile_rows rows: the tile of the exchanged vector
// ([tile_rows, K+] float) at byte tile_offset of shared memory, the block's row dots
// ([k_split[phase], tile_rows, gates, rows] float partial sums) at pre_offset; resident weights
// at byte 0. A phase's row dots split K into k_split[phase] parts (one per warp item).
struct FastrnnPlan {
  int path;  // FastrnnPath
  int groups, blocks, units, outputs, tile_rows;  // blocks: per direction and group
  int k_split[2];
  int64_t tile_offset, pre_offset, shared_bytes;
};

struct FastrnnLayerShape {
  int cell;   // FastrnnCell
  int dtype;  // FastrnnDtype
  int T, B, H, P, D;
  bool proj;  // LSTM with projection (then P = proj_size)
};

struct FastrnnForwardArgs {
  FastrnnLayerShape shape;
  FastrnnPlan plan;
  const void* x_gates;        // T-typed [T, B, D*G*H], element strides x_stride
  int64_t x_stride[3];
  const int64_t* lengths;     // [B] valid steps per sequence (1..T), or null: all T
  const void* w_hh;           // T-typed [D, G*H, P+]
  const void* b_hh;           // T-typed [D, G*H] or null
  const void* w_hr;           // T-typed [D, P, H+] or null
  void* output;               // T-typed [T, B, D*P]: h_t, 0 at t >= length
  float* workspace;           // [T, B, D, W*H]: saved activations, 0 at t >= length
  float* h_state;             // [2, D, B, P+]: [0] holds h0 on entry; h_n ends in [T % 2]
  float* c_state;             // [D, B, H]: c0 on entry, c_n on exit (LSTM), else null
  float* u_state;             // [D, B, H+]: zeroed scratch for o * tanh(c) (projection), else null
};

struct FastrnnBackwardArgs {
  FastrnnLayerShape shape;
  FastrnnPlan plan;
  const void* grad_output;    // T-typed [T, B, D*P], element strides go_stride, or null
  int64_t go_stride[3];
  const int64_t* lengths;     // [B] or null
  const void* w_hh_t;         // T-typed [D, P, (G*H)+]: w_hh transposed per direction
  const void* w_hr_t;         // T-typed [D, H, P+]: w_hr transposed per direction, or null
  const void* output;         // T-typed [T, B, D*P]: the forward's output
  const float* workspace;     // [T, B, D, W*H]: the forward's workspace
  const float* h0;            // [D, B, P]
  const float* c0;            // [D, B, H] (LSTM) or null
  float* carry;               // [D, B, P]: grad_h_n (or zeros) on entry; scratch
  float* grad_c;              // [D, B, H]: grad_c_n (or zeros) on entry, grad_c0 on exit (LSTM)
  float* grad_hg;             // [2, D, B, (G*H)+]: zeroed scratch for hidden-side pre-activation grads
  float* grad_step;           // [D, B, P+]: zeroed scratch (projection), else null
  float* grad_proj;           // [T, B, D, P]: grad of the projected h_t, 0 at t >= length
                              // (projection), else null
  float* grad_x;              // [T, B, D, G*H]: grad of x_gates, 0 at t >= length
  float* grad_h0;             // [D, B, P]
};

// Run the layer on `stream` as args.plan says; returns the first CUDA error
// (cudaErrorInvalidValue for shapes or plans outside the limits). A cooperative launch the device
// refuses (cudaErrorCooperativeLaunchTooLarge: another process or partition holds SMs) runs
// step-wise instead; *path_run (if not null) receives the FastrnnPath that ran.
cudaError_t fastrnn_cuda_forward(const FastrnnForwardArgs& args, cudaStream_t stream, int* path_run);
cudaError_t fastrnn_cuda_backward(const FastrnnBackwardArgs& args, cudaStream_t stream, int* path_run);

// Registers, local (spill) bytes and static shared bytes of the compiled kernel of a pass.
cudaError_t fastrnn_cuda_attributes(int cell, int dtype, bool backward, cudaFuncAttributes* attributes);
