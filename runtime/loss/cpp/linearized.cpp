// The fused kernel's result as a libtorch autograd function: its value is the loss the
// kernel computed, its gradient with respect to the logits the one the kernel computed.
//
// tch has no custom autograd functions, so this small C++ part provides one. The kernel has
// already computed d loss / d logits when it runs with a gradient; the function's backward
// hands that tensor to autograd as it is when the upstream gradient is 1 (a plain
// `loss.backward()`), so the gradient is neither copied nor multiplied, and autograd can
// take it over as the leaf's `.grad` once the graph is freed. Other upstream gradients
// scale a copy, so a graph kept with `retain_graph` still sees the original.
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Linearized : public torch::autograd::Function<Linearized> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& value,
                            const at::Tensor& gradient) {
    ctx->save_for_backward({gradient});
    return value.clone();
  }

  static variable_list backward(AutogradContext* ctx, variable_list upstream) {
    at::Tensor gradient = ctx->get_saved_variables()[0];
    const at::Tensor& scale = upstream[0];
    bool unit = scale.defined() && scale.numel() == 1 && scale.item<double>() == 1.0;
    at::Tensor result = unit ? gradient : gradient.mul(scale);
    return {result, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// A new tensor whose value is `value` (a scalar) and whose gradient with respect to `input`
// is `gradient` (of `input`'s shape), or null with `*error` set to a message the caller frees
// with `free`.
at::Tensor* losscc_linearized(const at::Tensor* input, const at::Tensor* value, const at::Tensor* gradient,
                              char** error) {
  try {
    return new at::Tensor(Linearized::apply(*input, *value, *gradient));
  } catch (const std::exception& e) {
    *error = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
