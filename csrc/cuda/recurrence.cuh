// Shared pieces of the fastrnn CUDA kernels: dtype conversion, the cells, the on-chip
// weight slices, the batched row-dot product and the launch planning.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
// D directions, W workspace gates, L length of a weight row, nb blocks per direction.
//
// Work split: block (d, bi) of the grid [D * nb] owns hidden units j0 = bi*hs .. j0+hs (with all
// their gates) and, for a projection, outputs k0 = bi*ps .. k0+ps. Its weight rows stay in shared
// memory for the whole sequence (persistent path) or are read from global memory (step-wise path).
// State shared between blocks lives in small float buffers in global memory, read through L2
// (__ldcg) after a grid barrier.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastrnn_cuda.h"

namespace fastrnn {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchPerWarp = 4;      // batch rows one warp reuses a weight element for
constexpr int kTileFloats = 8192;     // batch tile budget: rows of the shared vector tile

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// ---- Cells. forward: pre-activations -> new state and saved activations; backward: BPTT of one
// step given grad_h (of h before projection) and grad_c, returning grads of the x-side (gx) and
// hidden-side (ghg) pre-activations, the direct grad of h_prev and grad_c_prev.

struct LstmCell {
  static constexpr int G = 4, W = 5;
  static constexpr bool kCellState = true, kUsesHPrev = false, kUsesHNew = false;
  __device__ static void forward(const float* xg, const float* hg, float, float c_prev,
                                 float& h, float& c, float* saved) {
    const float i = sigmoid(xg[0] + hg[0]), f = sigmoid(xg[1] + hg[1]);
    const float g = tanhf(xg[2] + hg[2]), o = sigmoid(xg[3] + hg[3]);
    c = f * c_prev + i * g;
    h = o * tanhf(c);
    saved[0] = i; saved[1] = f; saved[2] = g; saved[3] = o; saved[4] = c;
  }
  __device__ static void backward(float gh, float gc, const float* saved, float, float c_prev,
                                  float, float* gx, float* ghg, float& direct, float& gc_prev) {
    const float i = saved[0], f = saved[1], g = saved[2], o = saved[3], tc = tanhf(saved[4]);
    gc += gh * o * (1.f - tc * tc);
    gx[0] = gc * g * i * (1.f - i);
    gx[1] = gc * c_prev * f * (1.f - f);
    gx[2] = gc * i * (1.f - g * g);
    gx[3] = gh * tc * o * (1.f - o);
    for (int k = 0; k < G; ++k) ghg[k] = gx[k];
    direct = 0.f;
    gc_prev = gc * f;
  }
};

struct GruCell {
  static constexpr int G = 3, W = 4;
  static constexpr bool kCellState = false, kUsesHPrev = true, kUsesHNew = false;
  __device__ static void forward(const float* xg, const float* hg, float h_prev, float,
                                 float& h, float&, float* saved) {
    const float r = sigmoid(xg[0] + hg[0]), z = sigmoid(xg[1] + hg[1]);
    const float n = tanhf(xg[2] + r * hg[2]);
    h = n + z * (h_prev - n);
    saved[0] = r; saved[1] = z; saved[2] = n; saved[3] = hg[2];
  }
  __device__ static void backward(float gh, float, const float* saved, float h_prev, float,
                                  float, float* gx, float* ghg, float& direct, float& gc_prev) {
    const float r = saved[0], z = saved[1], n = saved[2], hn = saved[3];
    const float gn = gh * (1.f - z) * (1.f - n * n);
    gx[0] = gn * hn * r * (1.f - r);
    gx[1] = gh * (h_prev - n) * z * (1.f - z);
    gx[2] = gn;
    ghg[0] = gx[0]; ghg[1] = gx[1]; ghg[2] = gn * r;
    direct = gh * z;
    gc_prev = 0.f;
  }
};

template <bool kRelu>
struct RnnCell {
  static constexpr int G = 1, W = 0;
  static constexpr bool kCellState = false, kUsesHPrev = false, kUsesHNew = true;
  __device__ static void forward(const float* xg, const float* hg, float, float, float& h, float&,
                                 float*) {
    const float pre = xg[0] + hg[0];
    h = kRelu ? (pre < 0.f ? 0.f : pre) : tanhf(pre);  // NaN stays NaN (not fmaxf)
  }
  __device__ static void backward(float gh, float, const float*, float, float, float h_new,
                                  float* gx, float* ghg, float& direct, float& gc_prev) {
    gx[0] = kRelu ? (h_new <= 0.f ? 0.f : gh) : gh * (1.f - h_new * h_new);
    ghg[0] = gx[0];
    direct = 0.f;
    gc_prev = 0.f;
  }
};

// ---- Weight slices: rows r = 0..rows of gate g at row(g, r), each L elements long.

template <class T>
struct Slice {
  const T* base;
  int64_t gate_stride;  // elements between gate blocks
  int rows, len;
  __device__ const T* row(int g, int r) const { return base + g * gate_stride + int64_t(r) * len; }
};

// Copy the slice into shared memory laid out [NG][max_rows][L]; returns the shared slice.
template <int NG, class T>
__device__ Slice<T> stage_slice(const Slice<T>& src, T* dst, int max_rows) {
  const int per_gate = src.rows * src.len;
  for (int i = threadIdx.x; i < NG * per_gate; i += blockDim.x) {
    const int g = i / per_gate, rest = i - g * per_gate;
    dst[int64_t(g) * max_rows * src.len + rest] = src.base[g * src.gate_stride + rest];
  }
  return Slice<T>{dst, int64_t(max_rows) * src.len, src.rows, src.len};
}

// For every row r of `m` and batch row b < B: acc[g] = m.row(g, r) . vec[b], then
// epi(r, b, acc) on one lane. vec: [B, L] float in global memory (written by other blocks before
// a barrier); staged through `tile` ([tile_rows, L] float, shared) batch tile by batch tile.
// Every thread of the block must call this.
template <int NG, class T, class Epi>
__device__ void rows_dot(const Slice<T>& m, const float* vec, int B, float* tile, int tile_rows,
                         Epi&& epi) {
  const int L = m.len, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b0 = 0; b0 < B; b0 += tile_rows) {
    const int bc = min(tile_rows, B - b0);
    __syncthreads();
    for (int i = threadIdx.x; i < bc * L; i += blockDim.x) tile[i] = __ldcg(vec + int64_t(b0) * L + i);
    __syncthreads();
    const int groups = (bc + kBatchPerWarp - 1) / kBatchPerWarp;
    for (int item = warp; item < m.rows * groups; item += kWarps) {
      const int r = item / groups, bb0 = (item - r * groups) * kBatchPerWarp;
      const int nbb = min(kBatchPerWarp, bc - bb0);
      float acc[NG][kBatchPerWarp] = {};
      for (int k = lane; k < L; k += 32) {
        float v[kBatchPerWarp];
#pragma unroll
        for (int q = 0; q < kBatchPerWarp; ++q) v[q] = q < nbb ? tile[(bb0 + q) * L + k] : 0.f;
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          const float w = to_float(m.row(g, r)[k]);
#pragma unroll
          for (int q = 0; q < kBatchPerWarp; ++q) acc[g][q] = fmaf(w, v[q], acc[g][q]);
        }
      }
#pragma unroll
      for (int g = 0; g < NG; ++g)
#pragma unroll
        for (int q = 0; q < kBatchPerWarp; ++q)
#pragma unroll
          for (int off = 16; off > 0; off /= 2) acc[g][q] += __shfl_xor_sync(0xffffffffu, acc[g][q], off);
      if (lane == 0) {
        for (int q = 0; q < nbb; ++q) {
          float a[NG];
#pragma unroll
          for (int g = 0; g < NG; ++g) a[g] = acc[g][q];
          epi(r, b0 + bb0 + q, a);
        }
      }
    }
  }
}

__device__ __forceinline__ void grid_barrier(bool cooperative) {
  if (cooperative) cooperative_groups::this_grid().sync();
}

__host__ __device__ __forceinline__ int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- Launch planning (host).

struct Plan {
  int nb, hs, ps, tile_rows;
  bool resident;       // weights staged in shared memory, one cooperative launch
  size_t smem;         // dynamic shared memory bytes
};

// weight_elems(hs, ps): elements of the on-chip weight slices of one block; tile_len: longest
// vector row a phase stages. Picks the persistent path with the most blocks per direction whose
// grid is co-resident, else the step-wise path.
template <class Kernel, class WeightElems>
cudaError_t make_plan(Kernel kernel, const FastrnnLayerShape& s, int elem_size, int tile_len,
                      WeightElems weight_elems, Plan* plan) {
  int device = 0, sms = 0, smem_optin = 0, coop = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin);
  if (err != cudaSuccess) return err;
  const int tile_rows = std::max(1, std::min(s.B, kTileFloats / tile_len));
  const int64_t tile_bytes = int64_t(tile_rows) * tile_len * sizeof(float);
  if (int64_t(tile_len) * sizeof(float) > smem_optin) return cudaErrorInvalidValue;
  if (coop && !s.force_stepwise) {
    int last_nb = 0;
    for (int hs = 1; hs <= s.H; ++hs) {
      const int nb = ceil_div(s.H, hs);
      if (nb == last_nb) continue;
      last_nb = nb;
      const int rows = ceil_div(s.H, nb), ps = ceil_div(s.P, nb);
      const int64_t smem = align16(int64_t(weight_elems(rows, ps)) * elem_size) + tile_bytes;
      if (smem > smem_optin) break;
      int per_sm = 0;
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, size_t(smem));
      if (err != cudaSuccess) return err;
      if (int64_t(per_sm) * sms >= int64_t(s.D) * nb) {
        *plan = Plan{nb, rows, ps, tile_rows, true, size_t(smem)};
        return cudaSuccess;
      }
    }
  }
  const int hs = ceil_div(s.H, std::min(s.H, std::max(1, 4 * sms / s.D)));
  const int nb = ceil_div(s.H, hs);
  *plan = Plan{nb, hs, ceil_div(s.P, nb), tile_rows, false, size_t(tile_bytes)};
  return cudaSuccess;
}

// Launches `kernel` over the layer: once for the whole sequence, cooperatively, when the plan keeps
// the weights resident (the kernel's grid barriers separate the phases); otherwise once per step
// and phase for which runs_phase(step, phase) holds. Params has plan, s_begin, s_end and phases.
template <class Kernel, class Params, class RunsPhase>
cudaError_t launch_layer(Kernel kernel, Params& p, int num_directions, int steps,
                         const int (&phases)[2], RunsPhase runs_phase, cudaStream_t stream) {
  const dim3 grid(num_directions * p.plan.nb), block(kThreads);
  if (p.plan.resident) {
    void* args[] = {&p};
    const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid,
                                                        block, args, p.plan.smem, stream);
    return err == cudaSuccess ? cudaGetLastError() : err;
  }
  for (int step = 0; step < steps; ++step) {
    for (int phase : phases) {
      if (!runs_phase(step, phase)) continue;
      p.s_begin = step;
      p.s_end = step + 1;
      p.phases = phase;
      kernel<<<grid, block, p.plan.smem, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// Runs Run::run<Cell, Scalar>(a, stream) for the layer's cell and dtype, after checking that the
// shape is one the kernels take. Args is FastrnnForwardArgs or FastrnnBackwardArgs.
template <class Run, class Args>
cudaError_t dispatch_layer(const Args& a, cudaStream_t stream) {
  const FastrnnLayerShape& s = a.shape;
  if (s.T < 1 || s.B < 1 || s.H < 1 || s.P < 1 || s.D < 1 || s.D > 2 || s.H > kFastrnnMaxSize ||
      s.P > kFastrnnMaxSize || (s.proj && s.cell != kFastrnnLstm) || (!s.proj && s.P != s.H))
    return cudaErrorInvalidValue;
  auto by_cell = [&](auto scalar) -> cudaError_t {
    using Scalar = decltype(scalar);
    switch (s.cell) {
      case kFastrnnLstm: return Run::template run<LstmCell, Scalar>(a, stream);
      case kFastrnnGru: return Run::template run<GruCell, Scalar>(a, stream);
      case kFastrnnRnnTanh: return Run::template run<RnnCell<false>, Scalar>(a, stream);
      case kFastrnnRnnRelu: return Run::template run<RnnCell<true>, Scalar>(a, stream);
      default: return cudaErrorInvalidValue;
    }
  };
  switch (s.dtype) {
    case kFastrnnFloat32: return by_cell(float{});
    case kFastrnnFloat16: return by_cell(__half{});
    case kFastrnnBFloat16: return by_cell(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastrnn
