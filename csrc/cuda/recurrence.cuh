// Shared pieces of the fastrnn CUDA kernels: dtype conversion, the cells, 16-byte asynchronous
// copies, the block's row dots over a batch tile, and the launcher.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
// D directions, W workspace gates, K length of a weight row, K+ = K padded to kFastrnnPad,
// NG gates of one row dot, nr rows of one gate a block owns, bc rows of a batch tile.
//
// Work split (FastrnnPlan): block (d, g, i) of the grid [D * groups * blocks] owns, for the batch
// rows of group g, hidden units (with all their gates) and, for a projection, outputs. Its weight rows stay in shared memory for the whole
// sequence (resident path) or are re-read from global memory (streamed and step-wise paths).
// Vectors shared between blocks (h, gate grads) live in small padded float buffers in global
// memory: after a grid barrier each block copies a batch tile of one into shared memory with
// cp.async.cg (L2 only, so it sees the other blocks' writes), 16 bytes per copy, all in flight at
// once. One warp item of a row dot is UB rows x NG gates x BB batch rows over a K part: its lanes
// split the part into 4-element chunks (weights and tile read as 16-byte vectors), and a
// reduce-scatter over the lanes leaves each partial sum on one lane, which stores it to shared
// memory. The cell epilogue then runs on every thread, one (row, batch row) pair each.
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
constexpr int kPairsPerThread = 4;  // epilogue (row, batch row) pairs of one thread per batch tile
constexpr int kBatchPerItem = 8;    // BB: batch rows of one warp item

// UB: rows of one warp item for a row dot of NG gates (cuda_plan.py DOT_ROWS mirrors this).
template <int NG> struct DotRows { static constexpr int value = NG == 1 ? 4 : 2; };

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

// ---- Cells. forward: pre-activations (xg: x side, hg: hidden side; b_hh may sit on either
// except at gate kHiddenSideBias) -> new state and saved activations; backward: BPTT of one
// step given grad_h (of h before projection) and grad_c, returning grads of the x-side (gx) and
// hidden-side (ghg) pre-activations, the direct grad of h_prev and grad_c_prev.

struct LstmCell {
  static constexpr int G = 4, W = 5, kHiddenSideBias = -1;
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
  static constexpr int kHiddenSideBias = 2;  // b_hn sits inside r * (W_hn h + b_hn)
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
  static constexpr int G = 1, W = 0, kHiddenSideBias = -1;
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

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int padded(int k) { return ceil_div(k, kFastrnnPad) * kFastrnnPad; }

// ---- Vector loads and asynchronous copies.

// Elements k .. k+3 of a row as floats (p 8- or 16-byte aligned; shared or global memory).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ void copy16_async(void* shared_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Issues the copy of `bytes` (a multiple of 16) from global `src` to shared `dst`; every thread
// of the block takes part. Completes at copy_async_wait().
__device__ __forceinline__ void copy_async(void* dst, const void* src, int64_t bytes) {
  for (int64_t i = threadIdx.x; i < bytes / 16; i += kThreads)
    copy16_async(static_cast<char*>(dst) + i * 16, static_cast<const char*>(src) + i * 16);
}

// Rows of a block's weights: gate g, row r at base + g * gate_stride + r * row_len (elements).
template <class T>
struct Rows {
  const T* base;
  int64_t gate_stride;
  int row_len;  // K+
  __device__ const T* row(int g, int r) const { return base + g * gate_stride + int64_t(r) * row_len; }
};

// Copies rows 0..nr of NG gates into shared `dst` laid out [NG][max_rows][K+]; returns them there.
template <int NG, class T>
__device__ Rows<T> stage_rows(const Rows<T>& src, int nr, int max_rows, T* dst) {
  const int64_t gate_bytes = int64_t(nr) * src.row_len * sizeof(T);
  for (int g = 0; g < NG; ++g)
    copy_async(dst + int64_t(g) * max_rows * src.row_len, src.row(g, 0), gate_bytes);
  return Rows<T>{dst, int64_t(max_rows) * src.row_len, src.row_len};
}

// ---- Reduce-scatter over the 32 lanes of a warp: v[0..N) holds each lane's partial sums; after
// it, lane l holds in v[0..n) (n = N halved once per offset while even) the warp's total of the
// values at indices final_index(i, l). Lanes that differ only in plain_lane_bits hold copies.

template <int N, int Offset>
__device__ __forceinline__ void reduce_scatter(float* v, int lane) {
  if constexpr (Offset > 0) {
    if constexpr (N % 2 == 0) {
      constexpr int half = N / 2;
      const bool upper = (lane & Offset) != 0;
#pragma unroll
      for (int i = 0; i < half; ++i) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Offset);
      }
      reduce_scatter<half, Offset / 2>(v, lane);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], Offset);
      reduce_scatter<N, Offset / 2>(v, lane);
    }
  }
}

template <int N, int Offset = 16>
struct ScatterLayout {
  static constexpr bool kHalves = Offset > 0 && N % 2 == 0;
  using Next = ScatterLayout<(kHalves ? N / 2 : N), Offset / 2>;
  static constexpr int kKept = Offset > 0 ? Next::kKept : N;                        // values left
  static constexpr int kPlainBits = Offset > 0 ? (kHalves ? 0 : Offset) | Next::kPlainBits : 0;
  __device__ static int offset(int lane) {                                          // of index 0
    if constexpr (Offset == 0) return 0;
    else return (kHalves && (lane & Offset) ? N / 2 : 0) + Next::offset(lane);
  }
};
template <int N> struct ScatterLayout<N, 0> {
  static constexpr int kKept = N, kPlainBits = 0;
  __device__ static int offset(int) { return 0; }
};

// ---- Row dots of a block over one batch tile.
//
// For rows r < nr of NG gates (w) and tile rows q < bc: pre[kp][q][g][r] = the part kp (of ks) of
// w.row(g, r) . tile[q] over K+. tile: [bc, K+] float, shared; pre: [ks, bc, NG, nr] float,
// shared. Every thread of the block must call this; the caller syncs before and after.
template <int NG, class T>
__device__ void row_dots(const Rows<T>& w, int nr, const float* tile, int bc, int ks, float* pre) {
  constexpr int UB = DotRows<NG>::value, BB = kBatchPerItem, N = NG * UB * BB;
  using Layout = ScatterLayout<N>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = w.row_len / 4, per_part = ceil_div(chunks, ks);
  const int row_groups = ceil_div(nr, UB), batch_groups = ceil_div(bc, BB);
  const int items = row_groups * batch_groups * ks;
  for (int item = warp; item < items; item += kWarps) {
    const int kp = item % ks, rest = item / ks;
    const int q0 = (rest % batch_groups) * BB, r0 = (rest / batch_groups) * UB;
    const float* tile_rows[BB];
#pragma unroll
    for (int q = 0; q < BB; ++q) tile_rows[q] = tile + int64_t(min(q0 + q, bc - 1)) * w.row_len;
    const T* weight_rows[NG * UB];
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int u = 0; u < UB; ++u) weight_rows[g * UB + u] = w.row(g, min(r0 + u, nr - 1));
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
    const int c_end = min(chunks, (kp + 1) * per_part);
    for (int c = kp * per_part + lane; c < c_end; c += 32) {
      float4 h[BB];
#pragma unroll
      for (int q = 0; q < BB; ++q) h[q] = load4(tile_rows[q] + 4 * c);
#pragma unroll
      for (int gu = 0; gu < NG * UB; ++gu) {
        const float4 wv = load4(weight_rows[gu] + 4 * c);
#pragma unroll
        for (int q = 0; q < BB; ++q) {
          float& a = acc[gu * BB + q];
          a = fmaf(wv.x, h[q].x, a);
          a = fmaf(wv.y, h[q].y, a);
          a = fmaf(wv.z, h[q].z, a);
          a = fmaf(wv.w, h[q].w, a);
        }
      }
    }
    reduce_scatter<N, 16>(acc, lane);
    if ((lane & Layout::kPlainBits) != 0) continue;
    const int first = Layout::offset(lane);
#pragma unroll
    for (int i = 0; i < Layout::kKept; ++i) {
      const int index = first + i;  // = (g * UB + u) * BB + q
      const int q = index % BB, gu = index / BB, g = gu / UB, u = gu % UB;
      if (q0 + q < bc && r0 + u < nr) pre[((int64_t(kp) * bc + q0 + q) * NG + g) * nr + r0 + u] = acc[i];
    }
  }
}

// The row dots of one (row r, tile row q) pair by gate, summed over the K parts (layout of
// row_dots).
struct PairDots {
  const float* pre;
  int ks, bc, ng, nr, q, r;
  __device__ float operator()(int g) const {
    float total = 0.f;
    for (int kp = 0; kp < ks; ++kp) total += pre[((int64_t(kp) * bc + q) * ng + g) * nr + r];
    return total;
  }
};

// The block's place in the grid [D * groups * blocks]: direction, index within its group's blocks,
// and the batch rows [batch_begin, batch_end) of its group.
struct BlockPlace {
  int d, index, batch_begin, batch_end;
};
__device__ __forceinline__ BlockPlace block_place(const FastrnnPlan& plan, int B) {
  const int per_direction = plan.groups * plan.blocks, rest = blockIdx.x % per_direction;
  const int group_rows = ceil_div(B, plan.groups), begin = (rest / plan.blocks) * group_rows;
  return BlockPlace{int(blockIdx.x) / per_direction, rest % plan.blocks, begin, min(B, begin + group_rows)};
}

// One phase of a step for this block, batch tile by batch tile of its group: issues the copy of
// the tile of vec ([B, K+] float, global, K+ = w.row_len) into shared memory, calls
// load(m, b, r) for each (row r < nr, batch row b) pair m of this thread while the copy is in
// flight, runs the row dots of w, then calls finish(m, b, r, dots). Every thread must call this.
template <int NG, class T, class Load, class Finish>
__device__ __forceinline__ void run_phase(const FastrnnPlan& plan, const BlockPlace& place, const Rows<T>& w,
                                          int nr, const float* vec, int ks, unsigned char* smem, Load&& load,
                                          Finish&& finish) {
  float* tile = reinterpret_cast<float*>(smem + plan.tile_offset);  // [tile_rows, K+]
  float* pre = reinterpret_cast<float*>(smem + plan.pre_offset);    // [ks, tile_rows, NG, nr]
  for (int b0 = place.batch_begin; b0 < place.batch_end; b0 += plan.tile_rows) {
    const int bc = min(plan.tile_rows, place.batch_end - b0), pairs = bc * nr;
    __syncthreads();  // the previous tile's dots and epilogue are done with tile and pre
    copy_async(tile, vec + int64_t(b0) * w.row_len, int64_t(bc) * w.row_len * sizeof(float));
#pragma unroll
    for (int m = 0; m < kPairsPerThread; ++m) {
      const int pair = threadIdx.x + m * kThreads;
      if (pair < pairs) load(m, b0 + pair / nr, pair % nr);
    }
    copy_async_wait();
    __syncthreads();
    row_dots<NG>(w, nr, tile, bc, ks, pre);
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kPairsPerThread; ++m) {
      const int pair = threadIdx.x + m * kThreads;
      if (pair < pairs) finish(m, b0 + pair / nr, pair % nr, PairDots{pre, ks, bc, NG, nr, pair / nr, pair % nr});
    }
  }
}

__device__ __forceinline__ void grid_barrier(bool cooperative) {
  if (cooperative) cooperative_groups::this_grid().sync();
}

// ---- Launching (host).

// Checks the plan against the layer: every unit, output and batch row owned, tiles within the
// epilogue's registers, shared memory within what the device allows one block, one block per SM
// at most.
inline cudaError_t check_plan(const FastrnnPlan& plan, const FastrnnLayerShape& s, int max_rows) {
  int device = 0, sms = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const int64_t grid = int64_t(s.D) * plan.groups * plan.blocks;
  const bool ok = plan.path >= kFastrnnResident && plan.path <= kFastrnnStepwise && plan.groups >= 1 &&
                  plan.groups <= s.B && plan.blocks >= 1 && int64_t(plan.blocks) * plan.units >= s.H &&
                  int64_t(plan.blocks) * plan.outputs >= s.P && plan.tile_rows >= 1 &&
                  plan.tile_rows <= ceil_div(s.B, plan.groups) &&
                  int64_t(plan.tile_rows) * max_rows <= int64_t(kPairsPerThread) * kThreads &&
                  plan.k_split[0] >= 1 && plan.k_split[1] >= 1 && plan.tile_offset % 16 == 0 &&
                  plan.pre_offset % 16 == 0 && plan.shared_bytes <= smem_optin &&
                  (plan.path == kFastrnnStepwise || grid <= sms);
  return ok ? cudaSuccess : cudaErrorInvalidValue;
}

// Launches `kernel` over the layer: once for the whole sequence, cooperatively, on the resident
// and streamed paths (the kernel's grid barriers separate the phases); otherwise, or when the
// device refuses the cooperative grid, once per step and phase for which runs_phase(step, phase)
// holds. Params has plan, s_begin, s_end and phases; *path_run receives the path that ran.
template <class Kernel, class Params, class RunsPhase>
cudaError_t launch_layer(Kernel kernel, Params& p, int num_directions, int steps,
                         const int (&phases)[2], RunsPhase runs_phase, cudaStream_t stream,
                         int* path_run) {
  FastrnnPlan& plan = p.a.plan;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(plan.shared_bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(num_directions * plan.groups * plan.blocks), block(kThreads);
  if (plan.path != kFastrnnStepwise) {
    void* args[] = {&p};
    err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid, block, args,
                                      size_t(plan.shared_bytes), stream);
    if (err == cudaSuccess) {
      if (path_run) *path_run = plan.path;
      return cudaGetLastError();
    }
    if (err != cudaErrorCooperativeLaunchTooLarge && err != cudaErrorNotSupported) return err;
    (void)cudaGetLastError();  // the refusal is not sticky; run step-wise instead
    plan.path = kFastrnnStepwise;
  }
  if (path_run) *path_run = kFastrnnStepwise;
  for (int step = 0; step < steps; ++step) {
    for (int phase : phases) {
      if (!runs_phase(step, phase)) continue;
      p.s_begin = step;
      p.s_end = step + 1;
      p.phases = phase;
      kernel<<<grid, block, size_t(plan.shared_bytes), stream>>>(p);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// Attributes of the compiled kernels (forward.cu, backward.cu).
cudaError_t forward_attributes(int cell, int dtype, cudaFuncAttributes* attributes);
cudaError_t backward_attributes(int cell, int dtype, cudaFuncAttributes* attributes);

// Calls f(Cell{}, Scalar{}) for the cell and dtype codes; cudaErrorInvalidValue for unknown ones.
template <class F>
cudaError_t by_cell_and_dtype(int cell, int dtype, F&& f) {
  auto by_cell = [&](auto scalar) -> cudaError_t {
    switch (cell) {
      case kFastrnnLstm: return f(LstmCell{}, scalar);
      case kFastrnnGru: return f(GruCell{}, scalar);
      case kFastrnnRnnTanh: return f(RnnCell<false>{}, scalar);
      case kFastrnnRnnRelu: return f(RnnCell<true>{}, scalar);
      default: return cudaErrorInvalidValue;
    }
  };
  switch (dtype) {
    case kFastrnnFloat32: return by_cell(float{});
    case kFastrnnFloat16: return by_cell(__half{});
    case kFastrnnBFloat16: return by_cell(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// Runs Run::run<Cell, Scalar>(a, stream, path_run) for the layer's cell and dtype, after checking
// that the shape is one the kernels take. Args is FastrnnForwardArgs or FastrnnBackwardArgs.
template <class Run, class Args>
cudaError_t dispatch_layer(const Args& a, cudaStream_t stream, int* path_run) {
  const FastrnnLayerShape& s = a.shape;
  if (s.T < 1 || s.B < 1 || s.H < 1 || s.P < 1 || s.D < 1 || s.D > 2 || s.H > kFastrnnMaxSize ||
      s.P > kFastrnnMaxSize || (s.proj && s.cell != kFastrnnLstm) || (!s.proj && s.P != s.H))
    return cudaErrorInvalidValue;
  return by_cell_and_dtype(s.cell, s.dtype, [&](auto cell, auto scalar) {
    return Run::template run<decltype(cell), decltype(scalar)>(a, stream, path_run);
  });
}

}  // namespace fastrnn
