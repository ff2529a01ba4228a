// Forward of one recurrent layer, all directions in one launch.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
// D directions, W workspace gates, K+ padded row length (recurrence.cuh); s is the step counter,
// t = s (direction 0) or T-1-s (direction 1); j a hidden unit, k a projection output, q a row of
// the batch tile starting at batch row b0.
//
// Per step: phase A, every block for its hidden units j and all b: gates = W_hh[rows of j] h_{s-1}
// + x_gates + b_hh, fused cell, writes workspace, c and (without projection) h_s and the output.
// With a projection, phase B: every block for its outputs k: h_s[k] = W_hr[k] . (o * tanh(c)).
// Each phase runs batch tile by batch tile: the tile copy of h (or of o * tanh(c)) is issued, the
// epilogue's inputs (x_gates, b_hh, c, h of its own pairs) are loaded into registers while it is
// in flight, then the row dots and the epilogue run. Resident and streamed paths: one cooperative
// launch, a grid barrier after each phase. Step-wise path: one launch per step and phase.

#include "recurrence.cuh"

namespace fastrnn {
namespace {

constexpr int kPhaseGates = 1, kPhaseProj = 2;

struct ForwardParams {
  FastrnnForwardArgs a;
  int s_begin, s_end, phases;
};

template <class Cell, class Scalar>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardParams p) {
  constexpr int G = Cell::G, kSaved = Cell::W > 0 ? Cell::W : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  const FastrnnForwardArgs& a = p.a;
  const FastrnnPlan& plan = a.plan;
  const int T = a.shape.T, B = a.shape.B, H = a.shape.H, P = a.shape.P, D = a.shape.D;
  const int Pp = padded(P), Hp = padded(H);
  const bool proj = a.shape.proj;
  const BlockPlace place = block_place(plan, B);
  const int d = place.d, bi = place.index;
  const int j0 = bi * plan.units, k0 = bi * plan.outputs;
  const int nj = max(0, min(plan.units, H - j0)), nk = proj ? max(0, min(plan.outputs, P - k0)) : 0;

  // w_hh rows g*H + j (j in this block's units) of direction d: [G][nj][P+]
  Rows<Scalar> wh{static_cast<const Scalar*>(a.w_hh) + (int64_t(d) * G * H + j0) * Pp, int64_t(H) * Pp, Pp};
  // w_hr rows k of direction d: [nk][H+]
  Rows<Scalar> wr{proj ? static_cast<const Scalar*>(a.w_hr) + (int64_t(d) * P + k0) * Hp : nullptr, 0, Hp};
  if (plan.path == kFastrnnResident) {
    Scalar* staged = reinterpret_cast<Scalar*>(smem);
    wh = stage_rows<G>(wh, nj, plan.units, staged);
    if (proj) wr = stage_rows<1>(wr, nk, plan.outputs, staged + int64_t(G) * plan.units * Pp);
  }
  const Scalar* x = static_cast<const Scalar*>(a.x_gates);
  const Scalar* b_hh = a.b_hh ? static_cast<const Scalar*>(a.b_hh) + int64_t(d) * G * H : nullptr;
  Scalar* out = static_cast<Scalar*>(a.output);
  const bool cooperative = plan.path != kFastrnnStepwise;
  auto length = [&](int b) { return a.lengths ? int(a.lengths[b]) : T; };
  // What the epilogue of pair m reads besides the row dots, loaded while the tile is copied.
  float xg[kPairsPerThread][G], hidden_bias[kPairsPerThread], c_prev[kPairsPerThread], h_old[kPairsPerThread];

  for (int s = p.s_begin; s < p.s_end; ++s) {
    const int t = d == 0 ? s : T - 1 - s;
    const float* h_prev = a.h_state + (int64_t(s & 1) * D + d) * B * Pp;        // [B, P+]
    float* h_next = a.h_state + (int64_t((s + 1) & 1) * D + d) * B * Pp;        // [B, P+]
    if (p.phases & kPhaseGates) {
      auto load = [&](int m, int b, int r) {
        const int j = j0 + r;
        hidden_bias[m] = 0.f;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float bias = b_hh ? to_float(b_hh[g * H + j]) : 0.f;
          xg[m][g] = to_float(x[t * a.x_stride[0] + b * a.x_stride[1] +
                                (int64_t(d) * G * H + g * H + j) * a.x_stride[2]]);
          if (g == Cell::kHiddenSideBias) hidden_bias[m] = bias;
          else xg[m][g] += bias;  // the cell adds x and hidden sides: the bias may sit on either
        }
        c_prev[m] = Cell::kCellState ? __ldcg(a.c_state + (int64_t(d) * B + b) * H + j) : 0.f;
        h_old[m] = proj ? 0.f : __ldcg(h_prev + int64_t(b) * Pp + j);
      };
      auto finish = [&](int m, int b, int r, const PairDots& dots) {
        const int j = j0 + r;
        const bool valid = t < length(b);
        float hg[G], saved[kSaved], h = 0.f, c = 0.f;
#pragma unroll
        for (int g = 0; g < G; ++g) hg[g] = dots(g) + (g == Cell::kHiddenSideBias ? hidden_bias[m] : 0.f);
        Cell::forward(xg[m], hg, h_old[m], c_prev[m], h, c, saved);
        float* ws = a.workspace + ((int64_t(t) * B + b) * D + d) * Cell::W * H + j;
#pragma unroll
        for (int w = 0; w < Cell::W; ++w) ws[int64_t(w) * H] = valid ? saved[w] : 0.f;
        if (Cell::kCellState && valid) a.c_state[(int64_t(d) * B + b) * H + j] = c;
        if (proj) {
          if (valid) a.u_state[(int64_t(d) * B + b) * Hp + j] = h;
        } else {
          h_next[int64_t(b) * Pp + j] = valid ? h : h_old[m];
          out[(int64_t(t) * B + b) * D * P + int64_t(d) * P + j] = from_float<Scalar>(valid ? h : 0.f);
        }
      };
      run_phase<G>(plan, place, wh, nj, h_prev, plan.k_split[0], smem, load, finish);
      grid_barrier(cooperative);
    }
    if (proj && (p.phases & kPhaseProj)) {
      auto load = [&](int m, int b, int r) { h_old[m] = __ldcg(h_prev + int64_t(b) * Pp + k0 + r); };
      auto finish = [&](int m, int b, int r, const PairDots& dots) {
        const int k = k0 + r;
        const bool valid = t < length(b);
        const float h = valid ? dots(0) : h_old[m];
        h_next[int64_t(b) * Pp + k] = h;
        out[(int64_t(t) * B + b) * D * P + int64_t(d) * P + k] = from_float<Scalar>(valid ? h : 0.f);
      };
      const float* u = a.u_state + int64_t(d) * B * Hp;  // [B, H+]
      run_phase<1>(plan, place, wr, nk, u, plan.k_split[1], smem, load, finish);
      grid_barrier(cooperative);
    }
  }
}

template <class Cell, class Scalar>
cudaError_t run_forward(const FastrnnForwardArgs& a, cudaStream_t stream, int* path_run) {
  const FastrnnLayerShape& s = a.shape;
  cudaError_t err = check_plan(a.plan, s, std::max(a.plan.units, s.proj ? a.plan.outputs : 0));
  if (err != cudaSuccess) return err;
  ForwardParams p{a, 0, s.T, kPhaseGates | kPhaseProj};
  const int phases[2] = {kPhaseGates, kPhaseProj};
  return launch_layer(forward_kernel<Cell, Scalar>, p, s.D, s.T, phases,
                      [&](int, int phase) { return phase != kPhaseProj || s.proj; }, stream, path_run);
}

struct RunForward {
  template <class Cell, class Scalar>
  static cudaError_t run(const FastrnnForwardArgs& a, cudaStream_t stream, int* path_run) {
    return run_forward<Cell, Scalar>(a, stream, path_run);
  }
};

}  // namespace

cudaError_t forward_attributes(int cell, int dtype, cudaFuncAttributes* attributes) {
  return by_cell_and_dtype(cell, dtype, [&](auto c, auto scalar) {
    return cudaFuncGetAttributes(attributes, forward_kernel<decltype(c), decltype(scalar)>);
  });
}

}  // namespace fastrnn

cudaError_t fastrnn_cuda_forward(const FastrnnForwardArgs& a, cudaStream_t stream, int* path_run) {
  return fastrnn::dispatch_layer<fastrnn::RunForward>(a, stream, path_run);
}
