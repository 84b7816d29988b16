// CUDA kernels of the pairwise preference loss and its backward and their launchers
// (launch.h): one thread per pair evaluating pair_loss / pair_loss_grad of tdpo_math.h,
// as the CPU loop does. The ops themselves (checks, allocation) are in ops_cuda.cpp.
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

#include "../tdpo_math.h"
#include "device.h"
#include "launch.h"

namespace tdpo_ext::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t pair_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

int64_t blocks_for(int64_t pairs) { return (pairs + kThreads - 1) / kThreads; }

__global__ void preference_loss_kernel(PairArgs in, PairLossOut out) {
  const int64_t i = pair_index();
  if (i < in.pairs) out.write(i, pair_loss_at(in, i));
}

__global__ void preference_loss_backward_kernel(PairArgs in,
                                                const float* __restrict__ grad_losses,
                                                PairLossGradOut out) {
  const int64_t i = pair_index();
  if (i < in.pairs) out.write(i, pair_loss_grad_at(in, grad_losses, i));
}

}  // namespace

cudaError_t launch_preference_loss(const PairArgs& in, const PairLossOut& out) {
  return launch_kernel("tdpo_ext::preference_loss", TDPO_KERNEL(preference_loss_kernel),
                       blocks_for(in.pairs), kThreads, at::cuda::getCurrentCUDAStream(), in,
                       out);
}

cudaError_t launch_preference_loss_backward(const PairArgs& in, const float* grad_losses,
                                            const PairLossGradOut& out) {
  return launch_kernel("tdpo_ext::preference_loss_backward",
                       TDPO_KERNEL(preference_loss_backward_kernel), blocks_for(in.pairs),
                       kThreads, at::cuda::getCurrentCUDAStream(), in, grad_losses, out);
}

}  // namespace tdpo_ext::cuda
