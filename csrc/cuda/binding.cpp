// Python binding of the fastrnn CUDA launchers: checks the tensors and hands raw pointers,
// strides and the plan to the framework-free launchers in fastrnn_cuda.h. Shapes as documented
// there; the caller (fastrnn/backends/cuda.py) plans the layer (cuda_plan.py), pads and allocates
// every buffer. Absent tensors are passed as empty. forward and backward return the FastrnnPath
// that ran.

#include <vector>

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fastrnn_cuda.h"

namespace {

constexpr int kGates[] = {4, 3, 1, 1};  // by FastrnnCell

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFastrnnFloat32;
    case at::kHalf: return kFastrnnFloat16;
    case at::kBFloat16: return kFastrnnBFloat16;
    default: TORCH_CHECK(false, "fastrnn cuda: unsupported dtype ", t);
  }
  return -1;
}

// Pointer of a CUDA tensor on `device`, or null for an empty (absent) tensor.
template <class P>
P* pointer(const at::Tensor& t, const at::Device& device, const char* name, bool contiguous = true) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.device() == device, "fastrnn cuda: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(!contiguous || t.is_contiguous(), "fastrnn cuda: ", name, " must be contiguous");
  return static_cast<P*>(t.data_ptr());
}

float* state(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.scalar_type() == at::kFloat, "fastrnn cuda: ", name, " must be float32");
  return pointer<float>(t, device, name);
}

// gate_rows: G*H; P: the unpadded output size of a step.
FastrnnLayerShape layer_shape(int64_t cell, at::ScalarType dtype, int64_t D, int64_t gate_rows, bool proj,
                              int64_t T, int64_t B, int64_t P) {
  TORCH_CHECK(cell >= 0 && cell < 4, "fastrnn cuda: unknown cell ", cell);
  FastrnnLayerShape s{};
  s.cell = int(cell);
  s.dtype = dtype_code(dtype);
  s.T = int(T);
  s.B = int(B);
  s.D = int(D);
  s.H = int(gate_rows / kGates[cell]);
  s.P = int(P);
  s.proj = proj;
  return s;
}

// plan: [path, groups, blocks, units, outputs, tile_rows, k_split0, k_split1, tile_offset,
// pre_offset, shared_bytes] (cuda_plan.Plan.as_list()).
FastrnnPlan make_plan(const std::vector<int64_t>& v) {
  TORCH_CHECK(v.size() == 11, "fastrnn cuda: a plan has 11 entries, got ", v.size());
  FastrnnPlan plan{};
  plan.path = int(v[0]);
  plan.groups = int(v[1]);
  plan.blocks = int(v[2]);
  plan.units = int(v[3]);
  plan.outputs = int(v[4]);
  plan.tile_rows = int(v[5]);
  plan.k_split[0] = int(v[6]);
  plan.k_split[1] = int(v[7]);
  plan.tile_offset = v[8];
  plan.pre_offset = v[9];
  plan.shared_bytes = v[10];
  return plan;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastrnn cuda ", what, " failed: ", cudaGetErrorString(err));
}

int64_t forward(int64_t cell, const at::Tensor& x_gates, const at::Tensor& lengths, const at::Tensor& w_hh,
             const at::Tensor& b_hh, const at::Tensor& w_hr, const at::Tensor& output,
             const at::Tensor& workspace, const at::Tensor& h_state, const at::Tensor& c_state,
             const at::Tensor& u_state, const std::vector<int64_t>& plan) {
  const at::Device device = x_gates.device();
  TORCH_CHECK(device.is_cuda() && x_gates.dim() == 3, "fastrnn cuda: x_gates must be a CUDA [T, B, D*G*H]");
  TORCH_CHECK(x_gates.scalar_type() == w_hh.scalar_type() && output.scalar_type() == w_hh.scalar_type(),
              "fastrnn cuda: x_gates, w_hh and output must share a dtype");
  TORCH_CHECK(lengths.numel() == 0 || lengths.scalar_type() == at::kLong, "fastrnn cuda: lengths must be int64");
  const c10::cuda::CUDAGuard guard(device);
  FastrnnForwardArgs a{};
  TORCH_CHECK(w_hh.dim() == 3, "fastrnn cuda: w_hh must be [D, G*H, P+]");
  TORCH_CHECK(output.dim() == 3 && output.size(2) % w_hh.size(0) == 0, "fastrnn cuda: output must be [T, B, D*P]");
  a.shape = layer_shape(cell, w_hh.scalar_type(), w_hh.size(0), w_hh.size(1), w_hr.numel() > 0, x_gates.size(0),
                        x_gates.size(1), output.size(2) / w_hh.size(0));
  a.plan = make_plan(plan);
  a.x_gates = pointer<const void>(x_gates, device, "x_gates", false);
  for (int i = 0; i < 3; ++i) a.x_stride[i] = x_gates.stride(i);
  a.lengths = pointer<const int64_t>(lengths, device, "lengths");
  a.w_hh = pointer<const void>(w_hh, device, "w_hh");
  a.b_hh = pointer<const void>(b_hh, device, "b_hh");
  a.w_hr = pointer<const void>(w_hr, device, "w_hr");
  a.output = pointer<void>(output, device, "output");
  a.workspace = state(workspace, device, "workspace");
  a.h_state = state(h_state, device, "h_state");
  a.c_state = state(c_state, device, "c_state");
  a.u_state = state(u_state, device, "u_state");
  int path_run = -1;
  check(fastrnn_cuda_forward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream(), &path_run), "forward");
  return path_run;
}

int64_t backward(int64_t cell, const at::Tensor& grad_output, const at::Tensor& lengths, const at::Tensor& w_hh_t,
              const at::Tensor& w_hr_t, const at::Tensor& output, const at::Tensor& workspace,
              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& carry, const at::Tensor& grad_c,
              const at::Tensor& grad_hg, const at::Tensor& grad_step, const at::Tensor& grad_proj,
              const at::Tensor& grad_x, const at::Tensor& grad_h0, const std::vector<int64_t>& plan) {
  const at::Device device = output.device();
  TORCH_CHECK(device.is_cuda() && output.dim() == 3, "fastrnn cuda: output must be a CUDA [T, B, D*P]");
  TORCH_CHECK(output.scalar_type() == w_hh_t.scalar_type() &&
                  (grad_output.numel() == 0 || grad_output.scalar_type() == w_hh_t.scalar_type()),
              "fastrnn cuda: output, grad_output and w_hh must share a dtype");
  TORCH_CHECK(lengths.numel() == 0 || lengths.scalar_type() == at::kLong, "fastrnn cuda: lengths must be int64");
  TORCH_CHECK(w_hh_t.dim() == 3, "fastrnn cuda: w_hh_t must be [D, P, (G*H)+]");
  TORCH_CHECK(grad_x.dim() == 4, "fastrnn cuda: grad_x must be [T, B, D, G*H]");
  const c10::cuda::CUDAGuard guard(device);
  FastrnnBackwardArgs a{};
  a.shape = layer_shape(cell, w_hh_t.scalar_type(), w_hh_t.size(0), grad_x.size(3), w_hr_t.numel() > 0,
                        output.size(0), output.size(1), w_hh_t.size(1));
  a.plan = make_plan(plan);
  a.grad_output = pointer<const void>(grad_output, device, "grad_output", false);
  if (grad_output.numel() != 0)
    for (int i = 0; i < 3; ++i) a.go_stride[i] = grad_output.stride(i);
  a.lengths = pointer<const int64_t>(lengths, device, "lengths");
  a.w_hh_t = pointer<const void>(w_hh_t, device, "w_hh_t");
  a.w_hr_t = pointer<const void>(w_hr_t, device, "w_hr_t");
  a.output = pointer<const void>(output, device, "output");
  a.workspace = state(workspace, device, "workspace");
  a.h0 = state(h0, device, "h0");
  a.c0 = state(c0, device, "c0");
  a.carry = state(carry, device, "carry");
  a.grad_c = state(grad_c, device, "grad_c");
  a.grad_hg = state(grad_hg, device, "grad_hg");
  a.grad_step = state(grad_step, device, "grad_step");
  a.grad_proj = state(grad_proj, device, "grad_proj");
  a.grad_x = state(grad_x, device, "grad_x");
  a.grad_h0 = state(grad_h0, device, "grad_h0");
  int path_run = -1;
  check(fastrnn_cuda_backward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream(), &path_run), "backward");
  return path_run;
}

// (registers per thread, local bytes per thread, static shared bytes) of a pass's compiled kernel.
std::vector<int64_t> attributes(int64_t cell, at::ScalarType dtype, bool backward) {
  cudaFuncAttributes attributes{};
  check(fastrnn_cuda_attributes(int(cell), dtype_code(dtype), backward, &attributes), "attributes");
  return {attributes.numRegs, int64_t(attributes.localSizeBytes), int64_t(attributes.sharedSizeBytes)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn CUDA kernels: persistent recurrent layers (forward and BPTT)";
  m.def("forward", &forward, "Forward of one layer (shapes: csrc/cuda/fastrnn_cuda.h)");
  m.def("backward", &backward, "Backward of one layer (shapes: csrc/cuda/fastrnn_cuda.h)");
  m.def("attributes", &attributes, "(registers, local bytes, static shared bytes) of a pass's kernel");
  m.attr("max_size") = kFastrnnMaxSize;
  m.attr("pad") = kFastrnnPad;
}
