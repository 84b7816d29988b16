// CUDA implementations of the pairwise preference loss and its backward: one thread per
// pair evaluating pair_loss / pair_loss_grad of tdpo_math.h, as the CPU loop does.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "../checks.h"
#include "../tdpo_math.h"

namespace tdpo_ext::cuda {
namespace {

constexpr int kThreads = 256;

// The four (B,) float32 inputs, contiguous.
struct PairInputs {
  const float* chosen_margin;
  const float* rejected_margin;
  const float* chosen_kl;
  const float* rejected_kl;
};

PairInputs pair_inputs(const at::Tensor& mc, const at::Tensor& mr, const at::Tensor& kc,
                       const at::Tensor& kr) {
  return {mc.data_ptr<float>(), mr.data_ptr<float>(), kc.data_ptr<float>(),
          kr.data_ptr<float>()};
}

__device__ __forceinline__ int64_t pair_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

unsigned int blocks_for(int64_t pairs) {
  return static_cast<unsigned int>((pairs + kThreads - 1) / kThreads);
}

__global__ void preference_loss_kernel(PairInputs in, int64_t pairs, float beta, float alpha,
                                       Variant variant, float* __restrict__ losses,
                                       float* __restrict__ chosen_rewards,
                                       float* __restrict__ rejected_rewards) {
  const int64_t i = pair_index();
  if (i >= pairs) return;
  const PairLoss out = pair_loss(in.chosen_margin[i], in.rejected_margin[i], in.chosen_kl[i],
                                 in.rejected_kl[i], beta, alpha, variant);
  losses[i] = out.loss;
  chosen_rewards[i] = out.chosen_reward;
  rejected_rewards[i] = out.rejected_reward;
}

__global__ void preference_loss_backward_kernel(const float* __restrict__ grad_losses,
                                                PairInputs in, int64_t pairs, float beta,
                                                float alpha, Variant variant,
                                                float* __restrict__ d_chosen_margin,
                                                float* __restrict__ d_rejected_margin,
                                                float* __restrict__ d_chosen_kl,
                                                float* __restrict__ d_rejected_kl) {
  const int64_t i = pair_index();
  if (i >= pairs) return;
  const PairLossGrad d = pair_loss_grad(grad_losses[i], in.chosen_margin[i],
                                        in.rejected_margin[i], in.chosen_kl[i],
                                        in.rejected_kl[i], beta, alpha, variant);
  d_chosen_margin[i] = d.chosen_margin;
  d_rejected_margin[i] = d.rejected_margin;
  d_chosen_kl[i] = d.chosen_kl;
  d_rejected_kl[i] = d.rejected_kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> preference_loss_cuda(
    const at::Tensor& chosen_logps_margin, const at::Tensor& rejected_logps_margin,
    const at::Tensor& chosen_kl, const at::Tensor& rejected_kl, double beta, double alpha,
    std::string_view variant_name) {
  check_pair_inputs(chosen_logps_margin, rejected_logps_margin, chosen_kl, rejected_kl, beta);
  const Variant variant = parse_variant(variant_name);
  const c10::cuda::CUDAGuard guard(chosen_logps_margin.device());
  const at::Tensor mc = chosen_logps_margin.contiguous(), mr = rejected_logps_margin.contiguous(),
                   kc = chosen_kl.contiguous(), kr = rejected_kl.contiguous();
  at::Tensor losses = at::empty_like(mc), chosen_rewards = at::empty_like(mc),
             rejected_rewards = at::empty_like(mc);
  const int64_t pairs = mc.size(0);
  if (pairs == 0) return {losses, chosen_rewards, rejected_rewards};
  preference_loss_kernel<<<blocks_for(pairs), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      pair_inputs(mc, mr, kc, kr), pairs, static_cast<float>(beta), static_cast<float>(alpha),
      variant, losses.data_ptr<float>(), chosen_rewards.data_ptr<float>(),
      rejected_rewards.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {losses, chosen_rewards, rejected_rewards};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& chosen_logps_margin,
    const at::Tensor& rejected_logps_margin, const at::Tensor& chosen_kl,
    const at::Tensor& rejected_kl, double beta, double alpha, std::string_view variant_name) {
  check_pair_inputs(chosen_logps_margin, rejected_logps_margin, chosen_kl, rejected_kl, beta);
  const Variant variant = parse_variant(variant_name);
  check_grad_losses(grad_losses, chosen_logps_margin);
  const c10::cuda::CUDAGuard guard(chosen_logps_margin.device());
  const at::Tensor g = grad_losses.to(at::kFloat).contiguous();
  const at::Tensor mc = chosen_logps_margin.contiguous(), mr = rejected_logps_margin.contiguous(),
                   kc = chosen_kl.contiguous(), kr = rejected_kl.contiguous();
  at::Tensor d_mc = at::empty_like(mc), d_mr = at::empty_like(mc), d_kc = at::empty_like(mc),
             d_kr = at::empty_like(mc);
  const int64_t pairs = mc.size(0);
  if (pairs == 0) return {d_mc, d_mr, d_kc, d_kr};
  preference_loss_backward_kernel<<<blocks_for(pairs), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<float>(), pair_inputs(mc, mr, kc, kr), pairs, static_cast<float>(beta),
      static_cast<float>(alpha), variant, d_mc.data_ptr<float>(), d_mr.data_ptr<float>(),
      d_kc.data_ptr<float>(), d_kr.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {d_mc, d_mr, d_kc, d_kr};
}

}  // namespace

TORCH_LIBRARY_IMPL(tdpo_ext, CUDA, m) {
  m.impl("preference_loss", &preference_loss_cuda);
  m.impl("preference_loss_backward", &preference_loss_backward_cuda);
}

}  // namespace tdpo_ext::cuda
