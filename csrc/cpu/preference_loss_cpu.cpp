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
  at::Tensor losses = in.empty_output(), chosen_rewards = in.empty_output(),
             rejected_rewards = in.empty_output();
  const PairArgs args = in.args(beta, alpha);
  for (int64_t i = 0; i < args.pairs; ++i) {
    const PairLoss out = pair_loss_at(args, i);
    losses.data_ptr<float>()[i] = out.loss;
    chosen_rewards.data_ptr<float>()[i] = out.chosen_reward;
    rejected_rewards.data_ptr<float>()[i] = out.rejected_reward;
  }
  return {losses, chosen_rewards, rejected_rewards};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& chosen_logps_margin,
    const at::Tensor& rejected_logps_margin, const at::Tensor& chosen_kl,
    const at::Tensor& rejected_kl, double beta, double alpha, std::string_view variant) {
  const PairInputs in = prepare_pair_backward_inputs(grad_losses, chosen_logps_margin,
                                                     rejected_logps_margin, chosen_kl,
                                                     rejected_kl, beta, variant);
  at::Tensor d_mc = in.empty_output(), d_mr = in.empty_output(), d_kc = in.empty_output(),
             d_kr = in.empty_output();
  const PairArgs args = in.args(beta, alpha);
  for (int64_t i = 0; i < args.pairs; ++i) {
    const PairLossGrad d = pair_loss_grad_at(args, in.grad_losses.data_ptr<float>(), i);
    d_mc.data_ptr<float>()[i] = d.chosen_margin;
    d_mr.data_ptr<float>()[i] = d.rejected_margin;
    d_kc.data_ptr<float>()[i] = d.chosen_kl;
    d_kr.data_ptr<float>()[i] = d.rejected_kl;
  }
  return {d_mc, d_mr, d_kc, d_kr};
}

}  // namespace

TORCH_LIBRARY_IMPL(tdpo_ext, CPU, m) {
  m.impl("preference_loss", &preference_loss_cpu);
  m.impl("preference_loss_backward", &preference_loss_backward_cpu);
}

}  // namespace tdpo_ext::cpu
