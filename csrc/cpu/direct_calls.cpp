// Three ops as plain Python functions that skip torch's dispatcher (fastrnn._C_cpu's
// layer_step_direct, cell_step_direct and layer_forward_int8_direct), for the calls without
// gradients of fastrnn/ops.py and fastrnn/quantized.py. A call through the dispatcher costs ~1 us
// more (its arguments boxed against the op's schema, the results unboxed; ~2 us with the int8
// op's list of weights), and the same checks in Python ~4 us more, against ~7 us for a whole
// LSTM step at B1 H128. They run the kernel only where the dispatcher would run it straight away:
// plain, dense CPU tensors (no subclass, functorch wrapper or forward-mode tangent), no gradient
// wanted, and no autocast, tracer, functorch transform, dispatch mode or profiler in effect.
// Otherwise they return None and the caller runs the op. torch.compile never reaches them (their
// callers check first).

#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "rnn_ops.h"

namespace fastrnn_cpu {
namespace {

// A tensor the CPU kernel may read directly: dense, strided, on the CPU, none of the dispatch
// keys of subclasses, functorch, conjugate or negative views, and no forward-mode tangent.
bool plain_cpu(const Tensor& t) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutogradCPU,
                                          c10::DispatchKey::AutocastCPU});
  return t.layout() == at::kStrided && plain.isSupersetOf(t.key_set()) &&
         !t._fw_grad(/*level=*/0).defined();
}

// Whether this thread runs ops as plain kernels now: no gradient wanted of these tensors, and
// nothing (autocast, a functorch transform, a Python dispatch mode, the tracer) between an op
// call and its CPU kernel, nor anything recording op calls (the profiler), which then sees the op.
bool plain_call(at::ArrayRef<const Tensor*> tensors) {
  static const c10::DispatchKeySet always({c10::DispatchKey::BackendSelect,
                                           c10::DispatchKey::ADInplaceOrView});
  if (!always.isSupersetOf(c10::impl::tls_local_dispatch_key_set().included_) ||
      at::autocast::is_autocast_enabled(at::kCPU) || torch::jit::tracer::isTracing() ||
      at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION).has_value()) {
    return false;
  }
  if (!at::GradMode::is_enabled()) return true;
  for (const Tensor* t : tensors) {
    if (t != nullptr && t->requires_grad()) return false;
  }
  return true;
}

const Tensor* pointer(const std::optional<Tensor>& t) { return t ? &*t : nullptr; }

// Whether a step over these tensors (input first; null: absent) may skip the dispatcher: float32
// or bfloat16 plain CPU tensors, none empty, and a plain call (see above).
bool direct(const std::array<const Tensor*, 7>& tensors) {
  const Tensor& input = *tensors[0];
  const Tensor& w_hh = *tensors[4];
  const at::ScalarType dtype = input.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || input.numel() == 0 || w_hh.dim() != 2 ||
      w_hh.size(1) == 0) {
    return false;
  }
  for (const Tensor* t : tensors) {
    if (t != nullptr && (t->scalar_type() != dtype || !plain_cpu(*t))) return false;
  }
  return plain_call(tensors);
}

// layer_step's arguments and results as Python objects: (output, h_n, c_n or None), or None where
// the op must run instead.
py::object layer_step_direct(std::string_view cell, const Tensor& input,
                             const std::optional<Tensor>& h0, const std::optional<Tensor>& c0,
                             const Tensor& w_ih, const Tensor& w_hh,
                             const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                             bool batch_first) {
  if (!direct({&input, pointer(h0), pointer(c0), &w_ih, &w_hh, pointer(b_ih), pointer(b_hh)})) {
    return py::none();
  }
  std::vector<Tensor> result;
  {
    const py::gil_scoped_release no_gil;
    result = layer_step(cell, input, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_first);
  }
  return py::make_tuple(result[0], result[1],
                        result.size() > 2 ? py::cast(result[2]) : py::none());
}

// A step of a cell that needs no gradient, x [B, I], h [B, H], c [B, H] (LSTM) or None:
// (h' [B, H], c' [B, H] or None) as cell_step_forward gives them, or None where the cell_step op
// must run instead.
py::object cell_step_direct(std::string_view cell, const Tensor& x, const Tensor& h,
                            const std::optional<Tensor>& c, const Tensor& w_ih,
                            const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                            const std::optional<Tensor>& b_hh) {
  if (!direct({&x, &h, pointer(c), &w_ih, &w_hh, pointer(b_ih), pointer(b_hh)})) {
    return py::none();
  }
  Tensor h_new, c_new;
  {
    const py::gil_scoped_release no_gil;
    std::tie(h_new, c_new, std::ignore) =
        cell_step_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, false);
  }
  return py::make_tuple(h_new, c.has_value() ? py::cast(c_new) : py::none());
}

// layer_forward_int8 (x, h0 and c0 float32) as a Python tuple (output, h_n, c_n), or None where
// the op must run instead.
py::object layer_forward_int8_direct(std::string_view cell, const Tensor& x, const Tensor& h0,
                                     const std::optional<Tensor>& c0,
                                     const std::vector<Tensor>& weights, bool has_biases,
                                     const std::optional<Tensor>& lengths) {
  std::vector<const Tensor*> tensors{&x, &h0, pointer(c0), pointer(lengths)};
  for (const Tensor& w : weights) tensors.push_back(&w);
  for (const Tensor* t : tensors) {
    if (t != nullptr && !plain_cpu(*t)) return py::none();
  }
  if (x.scalar_type() != at::kFloat || !plain_call(tensors)) return py::none();
  Tensor output, h_n, c_n;
  {
    const py::gil_scoped_release no_gil;
    std::tie(output, h_n, c_n) = layer_forward_int8(cell, x, h0, c0, weights, has_biases, lengths);
  }
  return py::make_tuple(output, h_n, c_n);
}

}  // namespace
}  // namespace fastrnn_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_step_direct", &fastrnn_cpu::layer_step_direct,
        "layer_step without the dispatcher where it would only run the CPU kernel, else None");
  m.def("layer_forward_int8_direct", &fastrnn_cpu::layer_forward_int8_direct,
        "layer_forward_int8 without the dispatcher where it would only run the CPU kernel, else "
        "None");
  m.def("cell_step_direct", &fastrnn_cpu::cell_step_direct,
        "cell_step_forward without the dispatcher where it would only run the CPU kernel, else "
        "None");
}
