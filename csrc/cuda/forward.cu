// Forward of one recurrent layer, all directions in one launch.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
// D directions, W workspace gates; s is the step counter, t = s (direction 0) or T-1-s (direction 1).
//
// Per step: phase A, every block for its hidden units j and all b: gates = W_hh[rows of j] h_{s-1}
// + x_gates + b_hh, fused cell, writes workspace, c and (without projection) h_s and the output.
// With a projection, phase B: every block for its outputs k: h_s[k] = W_hr[k] . (o * tanh(c)).
// Persistent path: one cooperative launch, grid barrier after each phase, weights in shared memory.
// Step-wise path: one launch per step and phase, weights read from global memory.

#include "recurrence.cuh"

namespace fastrnn {
namespace {

constexpr int kPhaseGates = 1, kPhaseProj = 2;

struct ForwardParams {
  FastrnnForwardArgs a;
  Plan plan;
  int s_begin, s_end, phases;
};

template <class Cell, class Scalar>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams p) {
  constexpr int G = Cell::G;
  extern __shared__ __align__(16) unsigned char smem[];
  const FastrnnForwardArgs& a = p.a;
  const int T = a.shape.T, B = a.shape.B, H = a.shape.H, P = a.shape.P, D = a.shape.D;
  const bool proj = a.shape.proj;
  const int d = blockIdx.x / p.plan.nb, bi = blockIdx.x % p.plan.nb;
  const int j0 = bi * p.plan.hs, k0 = bi * p.plan.ps;
  const int nj = max(0, min(p.plan.hs, H - j0)), nk = proj ? max(0, min(p.plan.ps, P - k0)) : 0;

  // w_hh rows g*H + j (j in this block's units) of direction d: [G][nj][P]
  Slice<Scalar> wh{static_cast<const Scalar*>(a.w_hh) + (int64_t(d) * G * H + j0) * P, int64_t(H) * P, nj, P};
  // w_hr rows k of direction d: [nk][H]
  Slice<Scalar> wr{proj ? static_cast<const Scalar*>(a.w_hr) + (int64_t(d) * P + k0) * H : nullptr, 0, nk, H};
  float* tile = reinterpret_cast<float*>(smem);
  if (p.plan.resident) {
    Scalar* staged = reinterpret_cast<Scalar*>(smem);
    const int64_t wh_elems = int64_t(G) * p.plan.hs * P;
    wh = stage_slice<G>(wh, staged, p.plan.hs);
    if (proj) wr = stage_slice<1>(wr, staged + wh_elems, p.plan.ps);
    tile = reinterpret_cast<float*>(
        smem + align16((wh_elems + (proj ? int64_t(p.plan.ps) * H : 0)) * int64_t(sizeof(Scalar))));
  }
  const Scalar* x = static_cast<const Scalar*>(a.x_gates);
  const Scalar* b_hh = a.b_hh ? static_cast<const Scalar*>(a.b_hh) + int64_t(d) * G * H : nullptr;
  Scalar* out = static_cast<Scalar*>(a.output);
  const bool cooperative = p.plan.resident;

  for (int s = p.s_begin; s < p.s_end; ++s) {
    const int t = d == 0 ? s : T - 1 - s;
    const float* h_prev = a.h_state + (int64_t(s & 1) * D + d) * B * P;        // [B, P]
    float* h_next = a.h_state + (int64_t((s + 1) & 1) * D + d) * B * P;        // [B, P]
    if (p.phases & kPhaseGates) {
      rows_dot<G>(wh, h_prev, B, tile, p.plan.tile_rows, [&](int r, int b, const float* acc) {
        const int j = j0 + r;
        const bool valid = a.lengths == nullptr || t < a.lengths[b];
        float xg[G], hg[G], saved[Cell::W > 0 ? Cell::W : 1];
        for (int g = 0; g < G; ++g) {
          xg[g] = to_float(x[t * a.x_stride[0] + b * a.x_stride[1] +
                             (int64_t(d) * G * H + g * H + j) * a.x_stride[2]]);
          hg[g] = acc[g] + (b_hh ? to_float(b_hh[g * H + j]) : 0.f);
        }
        const int64_t state = (int64_t(d) * B + b) * H + j;
        const float hp = proj ? 0.f : __ldcg(h_prev + int64_t(b) * P + j);
        const float cp = Cell::kCellState ? __ldcg(a.c_state + state) : 0.f;
        float h = 0.f, c = 0.f;
        Cell::forward(xg, hg, hp, cp, h, c, saved);
        float* ws = a.workspace + ((int64_t(t) * B + b) * D + d) * Cell::W * H + j;
        for (int w = 0; w < Cell::W; ++w) ws[int64_t(w) * H] = valid ? saved[w] : 0.f;
        if (Cell::kCellState && valid) a.c_state[state] = c;
        if (proj) {
          if (valid) a.u_state[state] = h;
        } else {
          h_next[int64_t(b) * P + j] = valid ? h : hp;
          out[(int64_t(t) * B + b) * D * P + int64_t(d) * P + j] = from_float<Scalar>(valid ? h : 0.f);
        }
      });
      grid_barrier(cooperative);
    }
    if (proj && (p.phases & kPhaseProj)) {
      const float* u = a.u_state + int64_t(d) * B * H;  // [B, H]
      rows_dot<1>(wr, u, B, tile, p.plan.tile_rows, [&](int r, int b, const float* acc) {
        const int k = k0 + r;
        const bool valid = a.lengths == nullptr || t < a.lengths[b];
        const float h = valid ? acc[0] : __ldcg(h_prev + int64_t(b) * P + k);
        h_next[int64_t(b) * P + k] = h;
        out[(int64_t(t) * B + b) * D * P + int64_t(d) * P + k] = from_float<Scalar>(valid ? h : 0.f);
      });
      grid_barrier(cooperative);
    }
  }
}

template <class Cell, class Scalar>
cudaError_t run_forward(const FastrnnForwardArgs& a, cudaStream_t stream) {
  const FastrnnLayerShape& s = a.shape;
  constexpr int G = Cell::G;
  const int tile_len = s.proj ? std::max(s.P, s.H) : s.P;
  auto weight_elems = [&](int hs, int ps) {
    return int64_t(G) * hs * s.P + (s.proj ? int64_t(ps) * s.H : 0);
  };
  ForwardParams p{a, Plan{}, 0, s.T, kPhaseGates | kPhaseProj};
  auto kernel = forward_kernel<Cell, Scalar>;
  cudaError_t err = make_plan(kernel, s, sizeof(Scalar), tile_len, weight_elems, &p.plan);
  if (err != cudaSuccess) return err;
  const int phases[2] = {kPhaseGates, kPhaseProj};
  return launch_layer(kernel, p, s.D, s.T, phases,
                      [&](int, int phase) { return phase != kPhaseProj || s.proj; }, stream);
}

struct RunForward {
  template <class Cell, class Scalar>
  static cudaError_t run(const FastrnnForwardArgs& a, cudaStream_t stream) {
    return run_forward<Cell, Scalar>(a, stream);
  }
};

}  // namespace
}  // namespace fastrnn

cudaError_t fastrnn_cuda_forward(const FastrnnForwardArgs& a, cudaStream_t stream) {
  return fastrnn::dispatch_layer<fastrnn::RunForward>(a, stream);
}
