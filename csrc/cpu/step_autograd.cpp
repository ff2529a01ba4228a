// A step as one autograd node (rnn_ops.h: cell_step, cell_step_autograd).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "cell_pass.h"
#include "layer_plan.h"
#include "rnn_ops.h"

namespace fastrnn_cpu {
namespace {

// ---- a step as one autograd node (cell_step) -----------------------------------------------
// cell_step is cell_step_forward differentiated by a C++ node whose backward is
// cell_step_backward: an eager step loop pays no Python in its autograd graph. Where that
// backward must itself be differentiated (create_graph) or batched (vmap over the gradients),
// the node recomputes the step in torch's differentiable cell ops and differentiates those.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using StepForwardFn = decltype(cell_step_forward);
using StepBackwardFn = decltype(cell_step_backward);

// The registered ops, called through the dispatcher so that profilers see them.
const c10::TypedOperatorHandle<StepForwardFn>& step_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn_cpu::cell_step_forward", "")
                             .typed<StepForwardFn>();
  return op;
}

const c10::TypedOperatorHandle<StepBackwardFn>& step_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn_cpu::cell_step_backward", "")
                             .typed<StepBackwardFn>();
  return op;
}

std::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// Whether the native backward takes this gradient: undefined, or a strided tensor without a
// vmap (legacy or functorch) or functorch wrapper or a Python subclass around it.
bool plain_gradient(const Tensor& grad) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Batched,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Python});
  return !grad.defined() ||
         (grad.layout() == at::kStrided && !grad.key_set().has_any(wrapped));
}

// The gradients (7, in the inputs' order; undefined where !mask) of one step for grad_h and
// grad_c (undefined: unused), by recomputing it in torch's cell ops: the result carries a graph
// under create_graph (grad mode on) and batches under vmap.
std::array<Tensor, 7> step_vjp_by_recompute(Cell cell, const variable_list& saved,
                                            const Tensor& grad_h, const Tensor& grad_c,
                                            const std::array<bool, 7>& mask) {
  const bool create_graph = at::GradMode::is_enabled();
  const Tensor &x = saved[0], &h = saved[1], &c = saved[2], &w_ih = saved[3], &w_hh = saved[4];
  const auto b_ih = optional_of(saved[5]), b_hh = optional_of(saved[6]);
  Tensor h_new, c_new;
  {
    const at::AutoGradMode enable_grad(true);
    switch (cell) {
      case Cell::kLstm:
        std::tie(h_new, c_new) = at::lstm_cell(x, {h, c}, w_ih, w_hh, b_ih, b_hh);
        break;
      case Cell::kGru: h_new = at::gru_cell(x, h, w_ih, w_hh, b_ih, b_hh); break;
      case Cell::kRnnTanh: h_new = at::rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh); break;
      case Cell::kRnnRelu: h_new = at::rnn_relu_cell(x, h, w_ih, w_hh, b_ih, b_hh); break;
    }
  }
  variable_list outputs, grad_outputs, inputs;
  if (grad_h.defined()) {
    outputs.push_back(h_new);
    grad_outputs.push_back(grad_h);
  }
  if (grad_c.defined()) {
    outputs.push_back(c_new);
    grad_outputs.push_back(grad_c);
  }
  for (size_t i = 0; i < 7; ++i) {
    if (mask[i]) inputs.push_back(saved[i]);
  }
  std::array<Tensor, 7> grads;
  if (outputs.empty() || inputs.empty()) return grads;
  const variable_list found = torch::autograd::grad(outputs, inputs, grad_outputs, create_graph,
                                                    create_graph, /*allow_unused=*/true);
  for (size_t i = 0, next = 0; i < 7; ++i) {
    if (mask[i]) grads[i] = found[next++];
  }
  return grads;
}

class CellStep : public torch::autograd::Function<CellStep> {
 public:
  // (h_new, c_new, workspace) of cell_step_forward; c_new (but for an LSTM) and the workspace
  // are not differentiable
  static variable_list forward(AutogradContext* ctx, std::string_view cell, const Tensor& x,
                               const Tensor& h, const std::optional<Tensor>& c,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h_new, c_new, workspace] =
        step_forward_op().call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, true);
    ctx->save_for_backward({x, h, value_or_undefined(c), w_ih, w_hh, value_or_undefined(b_ih),
                            value_or_undefined(b_hh), h_new, workspace});
    ctx->saved_data["cell"] = std::string(cell);
    if (cell_info(cell).cell == Cell::kLstm) {
      ctx->mark_non_differentiable({workspace});
    } else {
      ctx->mark_non_differentiable({c_new, workspace});
    }
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    return {h_new, c_new, workspace};
  }

  // one gradient per argument of forward: none for the cell's name
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::string& name = ctx->saved_data["cell"].toStringRef();
    const Cell cell = cell_info(name).cell;
    const Tensor& grad_h = grad_outputs[0];
    const Tensor grad_c = cell == Cell::kLstm ? grad_outputs[1] : Tensor();
    std::array<bool, 7> mask{};  // x, h, c, w_ih, w_hh, b_ih, b_hh; absent ones have no edge
    for (size_t i = 0, edge = 0; i < 7; ++i) {
      if (saved[i].defined()) mask[i] = ctx->needs_input_grad(edge++);
    }
    std::array<Tensor, 7> grads;
    const bool transformed =
        c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
    if (at::GradMode::is_enabled() || transformed || !plain_gradient(grad_h) ||
        !plain_gradient(grad_c)) {
      grads = step_vjp_by_recompute(cell, saved, grad_h, grad_c, mask);
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto found = step_backward_op().call(name, optional_of(grad_h), optional_of(grad_c),
                                           saved[0], saved[1], optional_of(saved[2]), saved[3],
                                           saved[4], saved[7], saved[8], mask);
      grads = {std::get<0>(found), std::get<1>(found), std::get<2>(found), std::get<3>(found),
               std::get<4>(found), std::get<5>(found), std::get<6>(found)};
    }
    variable_list result{Tensor()};
    for (size_t i = 0; i < 7; ++i) result.push_back(mask[i] ? grads[i] : Tensor());
    return result;
  }
};

// cell_step where autograd records: a CellStep node when a graph is built, else the forward
// without a workspace.
}  // namespace

std::tuple<Tensor, Tensor, Tensor> cell_step_autograd(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh) {
  const auto requires_grad = [](const std::optional<Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || h.requires_grad() || requires_grad(c) || w_ih.requires_grad() ||
        w_hh.requires_grad() || requires_grad(b_ih) || requires_grad(b_hh))) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return step_forward_op().call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, false);
  }
  const variable_list out = CellStep::apply(cell, x, h, c, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2]};
}

// cell_step below autograd (inference mode): the forward without a workspace.
std::tuple<Tensor, Tensor, Tensor> cell_step(
    std::string_view cell, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh) {
  return step_forward_op().call(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, false);
}

}  // namespace fastrnn_cpu
