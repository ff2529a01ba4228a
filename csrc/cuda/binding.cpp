// Python binding of the fastrnn CUDA launchers: checks the tensors and hands raw pointers and
// strides to the framework-free launchers in fastrnn_cuda.h. Shapes as documented there; the
// caller (fastrnn/backends/cuda.py) allocates every buffer. Absent tensors are passed as empty.

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

FastrnnLayerShape layer_shape(int64_t cell, const at::Tensor& w_hh, const at::Tensor& w_hr, int64_t T,
                              int64_t B, bool force_stepwise) {
  TORCH_CHECK(cell >= 0 && cell < 4, "fastrnn cuda: unknown cell ", cell);
  TORCH_CHECK(w_hh.dim() == 3, "fastrnn cuda: w_hh must be [D, G*H, P]");
  FastrnnLayerShape s{};
  s.cell = int(cell);
  s.dtype = dtype_code(w_hh.scalar_type());
  s.T = int(T);
  s.B = int(B);
  s.D = int(w_hh.size(0));
  s.H = int(w_hh.size(1) / kGates[cell]);
  s.P = int(w_hh.size(2));
  s.proj = w_hr.numel() > 0;
  s.force_stepwise = force_stepwise;
  return s;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastrnn cuda ", what, " failed: ", cudaGetErrorString(err));
}

void forward(int64_t cell, const at::Tensor& x_gates, const at::Tensor& lengths, const at::Tensor& w_hh,
             const at::Tensor& b_hh, const at::Tensor& w_hr, const at::Tensor& output,
             const at::Tensor& workspace, const at::Tensor& h_state, const at::Tensor& c_state,
             const at::Tensor& u_state, bool force_stepwise) {
  const at::Device device = x_gates.device();
  TORCH_CHECK(device.is_cuda() && x_gates.dim() == 3, "fastrnn cuda: x_gates must be a CUDA [T, B, D*G*H]");
  TORCH_CHECK(x_gates.scalar_type() == w_hh.scalar_type() && output.scalar_type() == w_hh.scalar_type(),
              "fastrnn cuda: x_gates, w_hh and output must share a dtype");
  TORCH_CHECK(lengths.numel() == 0 || lengths.scalar_type() == at::kLong, "fastrnn cuda: lengths must be int64");
  const c10::cuda::CUDAGuard guard(device);
  FastrnnForwardArgs a{};
  a.shape = layer_shape(cell, w_hh, w_hr, x_gates.size(0), x_gates.size(1), force_stepwise);
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
  check(fastrnn_cuda_forward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()), "forward");
}

void backward(int64_t cell, const at::Tensor& grad_output, const at::Tensor& lengths, const at::Tensor& w_hh_t,
              const at::Tensor& w_hr_t, const at::Tensor& output, const at::Tensor& workspace,
              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& carry, const at::Tensor& grad_c,
              const at::Tensor& grad_hg, const at::Tensor& grad_step, const at::Tensor& grad_proj,
              const at::Tensor& grad_x, const at::Tensor& grad_h0, bool force_stepwise) {
  const at::Device device = output.device();
  TORCH_CHECK(device.is_cuda() && output.dim() == 3, "fastrnn cuda: output must be a CUDA [T, B, D*P]");
  TORCH_CHECK(output.scalar_type() == w_hh_t.scalar_type() &&
                  (grad_output.numel() == 0 || grad_output.scalar_type() == w_hh_t.scalar_type()),
              "fastrnn cuda: output, grad_output and w_hh must share a dtype");
  TORCH_CHECK(lengths.numel() == 0 || lengths.scalar_type() == at::kLong, "fastrnn cuda: lengths must be int64");
  TORCH_CHECK(w_hh_t.dim() == 3, "fastrnn cuda: w_hh_t must be [D, P, G*H]");
  const c10::cuda::CUDAGuard guard(device);
  // layer_shape reads [D, G*H, P]; w_hh_t is [D, P, G*H]
  FastrnnBackwardArgs a{};
  a.shape = layer_shape(cell, w_hh_t.transpose(1, 2), w_hr_t, output.size(0), output.size(1), force_stepwise);
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
  check(fastrnn_cuda_backward(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()), "backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn CUDA kernels: persistent recurrent layers (forward and BPTT)";
  m.def("forward", &forward, "Forward of one layer (shapes: csrc/cuda/fastrnn_cuda.h)");
  m.def("backward", &backward, "Backward of one layer (shapes: csrc/cuda/fastrnn_cuda.h)");
  m.attr("max_size") = kFastrnnMaxSize;
}
