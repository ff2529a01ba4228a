// Backward (BPTT) of one recurrent layer, all directions in one launch. Produces the grads of
// x_gates, h0, c0 and of the hidden-side pre-activations; the weight grads are GEMMs the caller
// runs over these afterwards.
//
// Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
// D directions, W workspace gates, K+ padded row length (recurrence.cuh); s is the backward step
// counter (0..T), t = T-1-s (direction 0) or s (direction 1) the time it handles; j a hidden
// unit, k a projection output, q a row of the batch tile starting at batch row b0.
//
// Per step s, without projection, every block for its units j and all b:
//   grad_h[j] = carry[j] + (W_hh^T grad_hg_{s-1})[j]        (the latter only if step s-1 was valid)
//   grad_step = grad_h + grad_output[t];  cell backward -> grad_x, grad_hg_s, grad_c;
//   carry[j] = direct grad of h_prev (GRU z * grad) if valid, else grad_step (passes through)
// With a projection, phase R for outputs k forms grad_step over P, then phase C for units j
// multiplies by W_hr and runs the cell backward. At s = T, grad_h is grad_h0.
// As in the forward, each phase runs batch tile by batch tile, the epilogue's inputs loaded into
// registers while the tile copy is in flight. Resident and streamed paths: one cooperative
// launch, a grid barrier after each phase. Step-wise path: one launch per step and phase.

#include "recurrence.cuh"

namespace fastrnn {
namespace {

constexpr int kPhaseReduce = 1, kPhaseCell = 2;

struct BackwardParams {
  FastrnnBackwardArgs a;
  int s_begin, s_end, phases;
};

// What the cell backward of one (unit, batch row) pair reads besides its incoming grad.
template <class Cell>
struct CellInputs {
  float saved[Cell::W > 0 ? Cell::W : 1];
  float h_prev, c_prev, h_new, grad_c;
};

template <class Cell, class Scalar>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardParams p) {
  constexpr int G = Cell::G;
  extern __shared__ __align__(16) unsigned char smem[];
  const FastrnnBackwardArgs& a = p.a;
  const FastrnnPlan& plan = a.plan;
  const int T = a.shape.T, B = a.shape.B, H = a.shape.H, P = a.shape.P, D = a.shape.D;
  const int GH = G * H, GHp = padded(GH), Pp = padded(P);
  const bool proj = a.shape.proj;
  const BlockPlace place = block_place(plan, B);
  const int d = place.d, bi = place.index;
  const int j0 = bi * plan.units, k0 = bi * plan.outputs;
  const int nj = max(0, min(plan.units, H - j0)), nk = proj ? max(0, min(plan.outputs, P - k0)) : 0;

  // w_hh^T rows of direction d: this block's units j (no projection) or outputs k: [rows][(G*H)+]
  const int wt_first = proj ? k0 : j0, wt_rows = proj ? nk : nj, wt_max = proj ? plan.outputs : plan.units;
  Rows<Scalar> wt{static_cast<const Scalar*>(a.w_hh_t) + (int64_t(d) * P + wt_first) * GHp, 0, GHp};
  // w_hr^T rows j of direction d: [nj][P+]
  Rows<Scalar> wrt{proj ? static_cast<const Scalar*>(a.w_hr_t) + (int64_t(d) * H + j0) * Pp : nullptr, 0, Pp};
  if (plan.path == kFastrnnResident) {
    Scalar* staged = reinterpret_cast<Scalar*>(smem);
    wt = stage_rows<1>(wt, wt_rows, wt_max, staged);
    if (proj) wrt = stage_rows<1>(wrt, nj, plan.units, staged + int64_t(wt_max) * GHp);
  }
  const Scalar* go = static_cast<const Scalar*>(a.grad_output);
  const Scalar* out = static_cast<const Scalar*>(a.output);
  const bool cooperative = plan.path != kFastrnnStepwise;
  auto length = [&](int b) { return a.lengths ? int(a.lengths[b]) : T; };
  // What the epilogue of pair m reads besides the row dots, loaded while the tile is copied.
  CellInputs<Cell> in[kPairsPerThread];
  float carry[kPairsPerThread], grad_out[kPairsPerThread];

  for (int s = p.s_begin; s < p.s_end; ++s) {
    const int t = d == 0 ? T - 1 - s : s;            // time of this step (s < T)
    const int t_before = d == 0 ? T - s : s - 1;     // time of step s-1 (s > 0)
    const float* ghg_prev = a.grad_hg + (int64_t((s + 1) & 1) * D + d) * B * GHp;  // [B, (G*H)+]
    float* ghg_cur = a.grad_hg + (int64_t(s & 1) * D + d) * B * GHp;               // [B, (G*H)+]

    auto before_valid = [&](int b) { return s > 0 && t_before < length(b); };
    auto grad_out_at = [&](int b, int k) {
      return go ? to_float(go[t * a.go_stride[0] + b * a.go_stride[1] + (int64_t(d) * P + k) * a.go_stride[2]])
                : 0.f;
    };
    // Loads the carry and output grad of h unit k (< P), batch row b for pair m; returns whether
    // the step is valid for b (s < T and t < length(b)).
    auto load_h_side = [&](int m, int b, int k) {
      const bool valid = s < T && t < length(b);
      carry[m] = __ldcg(a.carry + (int64_t(d) * B + b) * P + k);
      grad_out[m] = valid ? grad_out_at(b, k) : 0.f;
      return valid;
    };
    // The grad `g` reaching h unit k, batch row b at this step (carry, row dot, output grad). At
    // s == T it is grad_h0 instead: written there, and the result is false.
    auto h_gradient = [&](int m, int b, int k, const PairDots& dots, float& g) {
      const float gh = carry[m] + (before_valid(b) ? dots(0) : 0.f);
      if (s == T) {
        a.grad_h0[(int64_t(d) * B + b) * P + k] = gh;
        return false;
      }
      g = gh + grad_out[m];
      return true;
    };
    // The saved state of unit j, batch row b at time t (s < T and t < length(b)).
    auto load_inputs = [&](int b, int j, CellInputs<Cell>& in) {
      const int len = length(b);
      const bool has_prev = d == 0 ? t > 0 : t + 1 < len;
      const int tp = d == 0 ? t - 1 : t + 1;
      const float* ws = a.workspace + ((int64_t(t) * B + b) * D + d) * Cell::W * H + j;
#pragma unroll
      for (int w = 0; w < Cell::W; ++w) in.saved[w] = ws[int64_t(w) * H];
      in.h_prev = in.c_prev = in.h_new = in.grad_c = 0.f;
      if (Cell::kUsesHPrev)
        in.h_prev = has_prev ? to_float(out[(int64_t(tp) * B + b) * D * P + int64_t(d) * P + j])
                             : a.h0[(int64_t(d) * B + b) * P + j];
      if (Cell::kCellState) {
        in.c_prev = has_prev ? a.workspace[((int64_t(tp) * B + b) * D + d) * Cell::W * H + 4 * H + j]
                             : a.c0[(int64_t(d) * B + b) * H + j];
        in.grad_c = __ldcg(a.grad_c + (int64_t(d) * B + b) * H + j);
      }
      if (Cell::kUsesHNew) in.h_new = to_float(out[(int64_t(t) * B + b) * D * P + int64_t(d) * P + j]);
    };
    // Cell backward of unit j, batch row b at time t with grad `gh` of its unprojected h; writes
    // grad_x (zeros when t >= length) and returns the direct grad of h_prev.
    auto cell_step = [&](int b, int j, float gh, bool valid, const CellInputs<Cell>& in) {
      float* gx_out = a.grad_x + ((int64_t(t) * B + b) * D + d) * GH + j;
      if (!valid) {
#pragma unroll
        for (int g = 0; g < G; ++g) gx_out[int64_t(g) * H] = 0.f;
        return 0.f;
      }
      float gx[G], ghg[G], direct = 0.f, gc_prev = 0.f;
      Cell::backward(gh, in.grad_c, in.saved, in.h_prev, in.c_prev, in.h_new, gx, ghg, direct, gc_prev);
      if (Cell::kCellState) a.grad_c[(int64_t(d) * B + b) * H + j] = gc_prev;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        gx_out[int64_t(g) * H] = gx[g];
        ghg_cur[int64_t(b) * GHp + g * H + j] = ghg[g];
      }
      return direct;
    };

    if (!proj) {
      if (p.phases & kPhaseCell) {
        auto load = [&](int m, int b, int r) {
          if (load_h_side(m, b, j0 + r)) load_inputs(b, j0 + r, in[m]);
        };
        auto finish = [&](int m, int b, int r, const PairDots& dots) {
          float grad_step;
          if (!h_gradient(m, b, j0 + r, dots, grad_step)) return;
          const bool valid = t < length(b);
          const float direct = cell_step(b, j0 + r, grad_step, valid, in[m]);
          a.carry[(int64_t(d) * B + b) * P + j0 + r] = valid ? direct : grad_step;
        };
        run_phase<1>(plan, place, wt, nj, ghg_prev, plan.k_split[0], smem, load, finish);
        if (s < T) grid_barrier(cooperative);
      }
      continue;
    }
    float* grad_step = a.grad_step + int64_t(d) * B * Pp;  // [B, P+]
    if (p.phases & kPhaseReduce) {
      auto load = [&](int m, int b, int r) { load_h_side(m, b, k0 + r); };
      auto finish = [&](int m, int b, int r, const PairDots& dots) {
        const int k = k0 + r;
        float g;
        if (!h_gradient(m, b, k, dots, g)) return;
        const bool valid = t < length(b);
        grad_step[int64_t(b) * Pp + k] = g;
        a.grad_proj[((int64_t(t) * B + b) * D + d) * P + k] = valid ? g : 0.f;
        a.carry[(int64_t(d) * B + b) * P + k] = valid ? 0.f : g;
      };
      run_phase<1>(plan, place, wt, nk, ghg_prev, plan.k_split[0], smem, load, finish);
      if (s < T) grid_barrier(cooperative);
    }
    if (s < T && (p.phases & kPhaseCell)) {
      auto load = [&](int m, int b, int r) {
        if (t < length(b)) load_inputs(b, j0 + r, in[m]);
      };
      auto finish = [&](int m, int b, int r, const PairDots& dots) {
        cell_step(b, j0 + r, dots(0), t < length(b), in[m]);
      };
      run_phase<1>(plan, place, wrt, nj, grad_step, plan.k_split[1], smem, load, finish);
      grid_barrier(cooperative);
    }
  }
}

template <class Cell, class Scalar>
cudaError_t run_backward(const FastrnnBackwardArgs& a, cudaStream_t stream, int* path_run) {
  const FastrnnLayerShape& s = a.shape;
  cudaError_t err = check_plan(a.plan, s, std::max(a.plan.units, s.proj ? a.plan.outputs : 0));
  if (err != cudaSuccess) return err;
  BackwardParams p{a, 0, s.T + 1, kPhaseReduce | kPhaseCell};
  const int phases[2] = {kPhaseReduce, kPhaseCell};
  return launch_layer(backward_kernel<Cell, Scalar>, p, s.D, s.T + 1, phases, [&](int step, int phase) {
    return !(s.proj ? (phase == kPhaseCell && step == s.T) : phase == kPhaseReduce);
  }, stream, path_run);
}

struct RunBackward {
  template <class Cell, class Scalar>
  static cudaError_t run(const FastrnnBackwardArgs& a, cudaStream_t stream, int* path_run) {
    return run_backward<Cell, Scalar>(a, stream, path_run);
  }
};

}  // namespace

cudaError_t backward_attributes(int cell, int dtype, cudaFuncAttributes* attributes) {
  return by_cell_and_dtype(cell, dtype, [&](auto c, auto scalar) {
    return cudaFuncGetAttributes(attributes, backward_kernel<decltype(c), decltype(scalar)>);
  });
}

}  // namespace fastrnn

cudaError_t fastrnn_cuda_backward(const FastrnnBackwardArgs& a, cudaStream_t stream, int* path_run) {
  return fastrnn::dispatch_layer<fastrnn::RunBackward>(a, stream, path_run);
}

cudaError_t fastrnn_cuda_attributes(int cell, int dtype, bool backward, cudaFuncAttributes* attributes) {
  return backward ? fastrnn::backward_attributes(cell, dtype, attributes)
                  : fastrnn::forward_attributes(cell, dtype, attributes);
}
