// CPU implementations of the pairwise preference loss and its backward. One value per
// pair, so a plain loop over the shared formulas of tdpo_math.h is all there is.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../checks.h"
#include "../tdpo_math.h"

namespace tdpo_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> preference_loss_cpu(
    const at::Tensor& chosen_logps_margin, const at::Tensor& rejected_logps_margin,
    const at::Tensor& chosen_kl, const at::Tensor& rejected_kl, double beta, double alpha,
    std::string_view variant_name) {
  check_pair_inputs(chosen_logps_margin, rejected_logps_margin, chosen_kl, rejected_kl, beta);
  const Variant variant = parse_variant(variant_name);
  const at::Tensor mc = chosen_logps_margin.contiguous(), mr = rejected_logps_margin.contiguous(),
                   kc = chosen_kl.contiguous(), kr = rejected_kl.contiguous();
  at::Tensor losses = at::empty_like(mc), chosen_rewards = at::empty_like(mc),
             rejected_rewards = at::empty_like(mc);
  for (int64_t i = 0; i < mc.size(0); ++i) {
    const PairLoss out = pair_loss(mc.data_ptr<float>()[i], mr.data_ptr<float>()[i],
                                   kc.data_ptr<float>()[i], kr.data_ptr<float>()[i],
                                   static_cast<float>(beta), static_cast<float>(alpha), variant);
    losses.data_ptr<float>()[i] = out.loss;
    chosen_rewards.data_ptr<float>()[i] = out.chosen_reward;
    rejected_rewards.data_ptr<float>()[i] = out.rejected_reward;
  }
  return {losses, chosen_rewards, rejected_rewards};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& chosen_logps_margin,
    const at::Tensor& rejected_logps_margin, const at::Tensor& chosen_kl,
    const at::Tensor& rejected_kl, double beta, double alpha, std::string_view variant_name) {
  check_pair_inputs(chosen_logps_margin, rejected_logps_margin, chosen_kl, rejected_kl, beta);
  check_grad_losses(grad_losses, chosen_logps_margin);
  const Variant variant = parse_variant(variant_name);
  const at::Tensor g = grad_losses.to(at::kFloat).contiguous();
  const at::Tensor mc = chosen_logps_margin.contiguous(), mr = rejected_logps_margin.contiguous(),
                   kc = chosen_kl.contiguous(), kr = rejected_kl.contiguous();
  at::Tensor d_mc = at::empty_like(mc), d_mr = at::empty_like(mc), d_kc = at::empty_like(mc),
             d_kr = at::empty_like(mc);
  for (int64_t i = 0; i < mc.size(0); ++i) {
    const PairLossGrad d = pair_loss_grad(
        g.data_ptr<float>()[i], mc.data_ptr<float>()[i], mr.data_ptr<float>()[i],
        kc.data_ptr<float>()[i], kr.data_ptr<float>()[i], static_cast<float>(beta),
        static_cast<float>(alpha), variant);
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
