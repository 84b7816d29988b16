// CUDA kernels of the pairwise preference loss and its backward and their launchers
// (launch.h): one thread per pair evaluating pair_loss / pair_loss_grad of tdpo_math.h,
// as the CPU loop does. The ops themselves (checks, allocation) are in ops_cuda.cpp.
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

#include "../tdpo_math.h"
#include "launch.h"

namespace tdpo_ext::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t pair_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

unsigned int blocks_for(int64_t pairs) {
  return static_cast<unsigned int>((pairs + kThreads - 1) / kThreads);
}

__global__ void preference_loss_kernel(PairArgs in, float* __restrict__ losses,
                                       float* __restrict__ chosen_rewards,
                                       float* __restrict__ rejected_rewards) {
  const int64_t i = pair_index();
  if (i >= in.pairs) return;
  const PairLoss out = pair_loss_at(in, i);
  losses[i] = out.loss;
  chosen_rewards[i] = out.chosen_reward;
  rejected_rewards[i] = out.rejected_reward;
}

__global__ void preference_loss_backward_kernel(PairArgs in,
                                                const float* __restrict__ grad_losses,
                                                float* __restrict__ d_chosen_margin,
                                                float* __restrict__ d_rejected_margin,
                                                float* __restrict__ d_chosen_kl,
                                                float* __restrict__ d_rejected_kl) {
  const int64_t i = pair_index();
  if (i >= in.pairs) return;
  const PairLossGrad d = pair_loss_grad_at(in, grad_losses, i);
  d_chosen_margin[i] = d.chosen_margin;
  d_rejected_margin[i] = d.rejected_margin;
  d_chosen_kl[i] = d.chosen_kl;
  d_rejected_kl[i] = d.rejected_kl;
}

}  // namespace

cudaError_t launch_preference_loss(const PairArgs& in, float* losses, float* chosen_rewards,
                                   float* rejected_rewards) {
  preference_loss_kernel<<<blocks_for(in.pairs), kThreads, 0,
                           at::cuda::getCurrentCUDAStream()>>>(in, losses, chosen_rewards,
                                                               rejected_rewards);
  return cudaGetLastError();
}

cudaError_t launch_preference_loss_backward(const PairArgs& in, const float* grad_losses,
                                            float* d_chosen_margin, float* d_rejected_margin,
                                            float* d_chosen_kl, float* d_rejected_kl) {
  preference_loss_backward_kernel<<<blocks_for(in.pairs), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
      in, grad_losses, d_chosen_margin, d_rejected_margin, d_chosen_kl, d_rejected_kl);
  return cudaGetLastError();
}

}  // namespace tdpo_ext::cuda
