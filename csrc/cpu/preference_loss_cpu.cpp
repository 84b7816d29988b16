// CPU implementations of the pairwise preference loss and its backward. One value per
// pair, so a plain loop over the shared formulas of tdpo_math.h is all there is.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "../checks.h"
#include "../tdpo_math.h"

namespace tdpo_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> preference_loss_cpu(
    const at::Tensor& chosen_logps_margin, const at::Tensor& rejected_logps_margin,
    const at::Tensor& chosen_kl, const at::Tensor& rejected_kl, double beta, double alpha,
    std::string_view variant) {
  const PairInputs in = prepare_pair_inputs(chosen_logps_margin, rejected_logps_margin,
                                            chosen_kl, rejected_kl, beta, variant);
  const auto outputs = in.empty_loss_outputs();
  const PairLossOut out = pair_loss_out(outputs);
  const PairArgs args = in.args(beta, alpha);
  for (int64_t i = 0; i < args.pairs; ++i) out.write(i, pair_loss_at(args, i));
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& chosen_logps_margin,
    const at::Tensor& rejected_logps_margin, const at::Tensor& chosen_kl,
    const at::Tensor& rejected_kl, double beta, double alpha, std::string_view variant) {
  const PairInputs in = prepare_pair_backward_inputs(grad_losses, chosen_logps_margin,
                                                     rejected_logps_margin, chosen_kl,
                                                     rejected_kl, beta, variant);
  const auto outputs = in.empty_grad_outputs();
  const PairLossGradOut out = pair_loss_grad_out(outputs);
  const PairArgs args = in.args(beta, alpha);
  const float* upstream = in.grad_losses.data_ptr<float>();
  for (int64_t i = 0; i < args.pairs; ++i) out.write(i, pair_loss_grad_at(args, upstream, i));
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(tdpo_ext, CPU, m) {
  m.impl("preference_loss", &preference_loss_cpu);
  m.impl("preference_loss_backward", &preference_loss_backward_cpu);
}

}  // namespace tdpo_ext::cpu
