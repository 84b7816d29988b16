// The CUDA kernels' launchers (csrc/cuda/*.cu), called by the op implementations of
// csrc/cuda/ops_cuda.cpp.
//
// Every check, allocation and error of the CUDA ops lives in ops_cuda.cpp, compiled by
// the host C++ compiler as the CPU ops are, beside the same shared checks (checks.h); the
// .cu files hold the device code and launchers that only queue kernels on the current
// stream and return the launch's status, which the caller checks.
//
// Each launcher expects validated inputs, allocated outputs, a current device set by the
// caller's guard, and at least one row or pair of work.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include "../tdpo_math.h"

namespace tdpo_ext::cuda {

// token_stats: fills the five (N, T) float32 outputs, and the policy metrics when
// out.has_metrics(); first_bad_row (one int64 holding
// -1) receives the smallest row index n * T + t whose label is outside [0, V) and is not
// ignore_index.
cudaError_t launch_token_stats(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                               const at::Tensor& targets, int64_t ignore_index,
                               const TokenStatsOut& out, const at::Tensor& first_bad_row);

// token_stats_tile: folds the tile of columns [vocab_start, vocab_start + V) into each
// token's state: state_in (null for the first tile) and state_out are (N, T,
// kTileStateFloats) float32, contiguous, or (N, T, kTileStateWithMetricsFloats) with
// policy_metrics.
cudaError_t launch_token_stats_tile(const at::Tensor& policy_logits,
                                    const at::Tensor& ref_logits, const at::Tensor& targets,
                                    int64_t ignore_index, int64_t vocab_start,
                                    bool policy_metrics, const float* state_in,
                                    float* state_out);

// token_stats_finish: the five outputs from the contiguous state of whole rows, and the
// policy metrics when out.has_metrics() (the state then holds their floats).
cudaError_t launch_token_stats_finish(const at::Tensor& state, const at::Tensor& targets,
                                      int64_t ignore_index, const TokenStatsOut& out);

// token_stats_backward: writes grad (policy_logits' shape and dtype, contiguous) from
// dense float32 (N, T) upstream gradients and saved logsumexps; the logits are the
// columns [vocab_start, vocab_start + V) of their rows.
cudaError_t launch_token_stats_backward(const at::Tensor& grad_logp_pol,
                                        const at::Tensor& grad_token_kl,
                                        const at::Tensor& policy_logits,
                                        const at::Tensor& ref_logits, const at::Tensor& targets,
                                        const at::Tensor& lse_pol, const at::Tensor& lse_ref,
                                        int64_t ignore_index, int64_t vocab_start,
                                        const at::Tensor& grad);

// The pairwise loss over in.pairs pairs (PairArgs, tdpo_math.h).
cudaError_t launch_preference_loss(const PairArgs& in, const PairLossOut& out);

cudaError_t launch_preference_loss_backward(const PairArgs& in, const float* grad_losses,
                                            const PairLossGradOut& out);

}  // namespace tdpo_ext::cuda
