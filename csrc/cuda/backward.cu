// Backward (BPTT) of one recurrent layer, all directions in one launch. Produces the grads of
// x_gates, h0, c0 and of the hidden-side pre-activations; the weight grads are GEMMs the caller
// runs over these afterwards.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
// D directions, W workspace gates; s is the backward step counter (0..T), t = T-1-s
// (direction 0) or s (direction 1) the time it handles.
//
// Per step s, without projection, every block for its units j and all b:
//   grad_h[j] = carry[j] + (W_hh^T grad_hg_{s-1})[j]        (the latter only if step s-1 was valid)
//   grad_step = grad_h + grad_output[t];  cell backward -> grad_x, grad_hg_s, grad_c;
//   carry[j] = direct grad of h_prev (GRU z * grad) if valid, else grad_step (passes through)
// With a projection, phase R for outputs k forms grad_step over P, then phase C for units j
// multiplies by W_hr and runs the cell backward. At s = T, grad_h is grad_h0.
// Persistent path: one cooperative launch, grid barrier after each phase, weights in shared memory.
// Step-wise path: one launch per step and phase, weights read from global memory.

#include "recurrence.cuh"

namespace fastrnn {
namespace {

constexpr int kPhaseReduce = 1, kPhaseCell = 2;

struct BackwardParams {
  FastrnnBackwardArgs a;
  Plan plan;
  int s_begin, s_end, phases;
};

template <class Cell, class Scalar>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardParams p) {
  constexpr int G = Cell::G;
  extern __shared__ __align__(16) unsigned char smem[];
  const FastrnnBackwardArgs& a = p.a;
  const int T = a.shape.T, B = a.shape.B, H = a.shape.H, P = a.shape.P, D = a.shape.D;
  const int GH = G * H;
  const bool proj = a.shape.proj;
  const int d = blockIdx.x / p.plan.nb, bi = blockIdx.x % p.plan.nb;
  const int j0 = bi * p.plan.hs, k0 = bi * p.plan.ps;
  const int nj = max(0, min(p.plan.hs, H - j0)), nk = proj ? max(0, min(p.plan.ps, P - k0)) : 0;

  // w_hh^T rows of direction d: this block's units j (no projection) or outputs k: [rows][G*H]
  const int wt_first = proj ? k0 : j0, wt_max = proj ? p.plan.ps : p.plan.hs;
  Slice<Scalar> wt{static_cast<const Scalar*>(a.w_hh_t) + (int64_t(d) * P + wt_first) * GH, 0,
                   proj ? nk : nj, GH};
  // w_hr^T rows j of direction d: [nj][P]
  Slice<Scalar> wrt{proj ? static_cast<const Scalar*>(a.w_hr_t) + (int64_t(d) * H + j0) * P : nullptr,
                    0, proj ? nj : 0, P};
  float* tile = reinterpret_cast<float*>(smem);
  if (p.plan.resident) {
    Scalar* staged = reinterpret_cast<Scalar*>(smem);
    const int64_t wt_elems = int64_t(wt_max) * GH;
    wt = stage_slice<1>(wt, staged, wt_max);
    if (proj) wrt = stage_slice<1>(wrt, staged + wt_elems, p.plan.hs);
    tile = reinterpret_cast<float*>(
        smem + align16((wt_elems + (proj ? int64_t(p.plan.hs) * P : 0)) * int64_t(sizeof(Scalar))));
  }
  const Scalar* go = static_cast<const Scalar*>(a.grad_output);
  const Scalar* out = static_cast<const Scalar*>(a.output);
  const bool cooperative = p.plan.resident;
  auto length = [&](int b) { return a.lengths ? int(a.lengths[b]) : T; };

  for (int s = p.s_begin; s < p.s_end; ++s) {
    const int t = d == 0 ? T - 1 - s : s;            // time of this step (s < T)
    const int t_before = d == 0 ? T - s : s - 1;     // time of step s-1 (s > 0)
    const float* ghg_prev = a.grad_hg + (int64_t((s + 1) & 1) * D + d) * B * GH;  // [B, G*H]
    float* ghg_cur = a.grad_hg + (int64_t(s & 1) * D + d) * B * GH;               // [B, G*H]

    // Incoming grad of h_{t} in output column k: carry plus W_hh^T grad_hg of step s-1.
    auto grad_h_at = [&](int b, int k, float dot) {
      const bool before_valid = s > 0 && t_before < length(b);
      return __ldcg(a.carry + (int64_t(d) * B + b) * P + k) + (before_valid ? dot : 0.f);
    };
    auto grad_out_at = [&](int b, int k) {
      return go ? to_float(go[t * a.go_stride[0] + b * a.go_stride[1] +
                              (int64_t(d) * P + k) * a.go_stride[2]])
                : 0.f;
    };
    // Cell backward of unit j, batch b at time t with grad `gh` of its unprojected h; writes
    // grad_x (zeros when t >= length) and returns the direct grad of h_prev.
    auto cell_step = [&](int b, int j, float gh, bool valid) {
      float* gx_out = a.grad_x + ((int64_t(t) * B + b) * D + d) * GH + j;
      if (!valid) {
        for (int g = 0; g < G; ++g) gx_out[int64_t(g) * H] = 0.f;
        return 0.f;
      }
      const int len = length(b);
      const bool has_prev = d == 0 ? t > 0 : t + 1 < len;
      const int tp = d == 0 ? t - 1 : t + 1;
      const float* ws = a.workspace + ((int64_t(t) * B + b) * D + d) * Cell::W * H + j;
      float saved[Cell::W > 0 ? Cell::W : 1];
      for (int w = 0; w < Cell::W; ++w) saved[w] = ws[int64_t(w) * H];
      float hp = 0.f, cp = 0.f, hn = 0.f;
      if (Cell::kUsesHPrev)
        hp = has_prev ? to_float(out[(int64_t(tp) * B + b) * D * P + int64_t(d) * P + j])
                      : a.h0[(int64_t(d) * B + b) * P + j];
      if (Cell::kCellState)
        cp = has_prev ? a.workspace[((int64_t(tp) * B + b) * D + d) * Cell::W * H + 4 * H + j]
                      : a.c0[(int64_t(d) * B + b) * H + j];
      if (Cell::kUsesHNew) hn = to_float(out[(int64_t(t) * B + b) * D * P + int64_t(d) * P + j]);
      const int64_t state = (int64_t(d) * B + b) * H + j;
      const float gc = Cell::kCellState ? __ldcg(a.grad_c + state) : 0.f;
      float gx[G], ghg[G], direct = 0.f, gc_prev = 0.f;
      Cell::backward(gh, gc, saved, hp, cp, hn, gx, ghg, direct, gc_prev);
      if (Cell::kCellState) a.grad_c[state] = gc_prev;
      for (int g = 0; g < G; ++g) {
        gx_out[int64_t(g) * H] = gx[g];
        ghg_cur[int64_t(b) * GH + g * H + j] = ghg[g];
      }
      return direct;
    };

    if (!proj) {
      if (p.phases & kPhaseCell) {
        rows_dot<1>(wt, ghg_prev, B, tile, p.plan.tile_rows, [&](int r, int b, const float* acc) {
          const int j = j0 + r;
          const int64_t idx = (int64_t(d) * B + b) * P + j;
          const float gh = grad_h_at(b, j, acc[0]);
          if (s == T) {
            a.grad_h0[idx] = gh;
            return;
          }
          const bool valid = t < length(b);
          const float grad_step = gh + (valid ? grad_out_at(b, j) : 0.f);
          const float direct = cell_step(b, j, grad_step, valid);
          a.carry[idx] = valid ? direct : grad_step;
        });
        if (s < T) grid_barrier(cooperative);
      }
      continue;
    }
    float* grad_step = a.grad_step + int64_t(d) * B * P;  // [B, P]
    if (p.phases & kPhaseReduce) {
      rows_dot<1>(wt, ghg_prev, B, tile, p.plan.tile_rows, [&](int r, int b, const float* acc) {
        const int k = k0 + r;
        const int64_t idx = (int64_t(d) * B + b) * P + k;
        const float gh = grad_h_at(b, k, acc[0]);
        if (s == T) {
          a.grad_h0[idx] = gh;
          return;
        }
        const bool valid = t < length(b);
        const float g = gh + (valid ? grad_out_at(b, k) : 0.f);
        grad_step[int64_t(b) * P + k] = g;
        a.grad_proj[((int64_t(t) * B + b) * D + d) * P + k] = valid ? g : 0.f;
        a.carry[idx] = valid ? 0.f : g;
      });
      if (s < T) grid_barrier(cooperative);
    }
    if (s < T && (p.phases & kPhaseCell)) {
      rows_dot<1>(wrt, grad_step, B, tile, p.plan.tile_rows, [&](int r, int b, const float* acc) {
        cell_step(b, j0 + r, acc[0], t < length(b));
      });
      grid_barrier(cooperative);
    }
  }
}

template <class Cell, class Scalar>
cudaError_t run_backward(const FastrnnBackwardArgs& a, cudaStream_t stream) {
  const FastrnnLayerShape& s = a.shape;
  const int GH = Cell::G * s.H;
  const int tile_len = s.proj ? std::max(GH, s.P) : GH;
  auto weight_elems = [&](int hs, int ps) {
    return s.proj ? int64_t(ps) * GH + int64_t(hs) * s.P : int64_t(hs) * GH;
  };
  BackwardParams p{a, Plan{}, 0, s.T + 1, kPhaseReduce | kPhaseCell};
  auto kernel = backward_kernel<Cell, Scalar>;
  cudaError_t err = make_plan(kernel, s, sizeof(Scalar), tile_len, weight_elems, &p.plan);
  if (err != cudaSuccess) return err;
  const int phases[2] = {kPhaseReduce, kPhaseCell};
  return launch_layer(kernel, p, s.D, s.T + 1, phases, [&](int step, int phase) {
    return !(s.proj ? (phase == kPhaseCell && step == s.T) : phase == kPhaseReduce);
  }, stream);
}

struct RunBackward {
  template <class Cell, class Scalar>
  static cudaError_t run(const FastrnnBackwardArgs& a, cudaStream_t stream) {
    return run_backward<Cell, Scalar>(a, stream);
  }
};

}  // namespace
}  // namespace fastrnn

cudaError_t fastrnn_cuda_backward(const FastrnnBackwardArgs& a, cudaStream_t stream) {
  return fastrnn::dispatch_layer<fastrnn::RunBackward>(a, stream);
}
