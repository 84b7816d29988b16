// The CUDA implementations of the tdpo_ext ops: validation, device guard, output
// allocation and errors here, compiled by the host C++ compiler; the kernels and their
// launchers are in token_stats.cu and preference_loss.cu (launch.h says why the split).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "../checks.h"
#include "launch.h"

namespace tdpo_ext::cuda {
namespace {

TokenStatsOutputs token_stats_cuda(const at::Tensor& policy_logits_in,
                                    const at::Tensor& ref_logits_in, const at::Tensor& targets,
                                    int64_t ignore_index, bool policy_metrics) {
  const int64_t vocab = check_token_stats_inputs(policy_logits_in, ref_logits_in, targets);
  const c10::cuda::CUDAGuard guard(policy_logits_in.device());
  const at::Tensor policy_logits = with_unit_vocab_stride(policy_logits_in);
  const at::Tensor ref_logits = with_unit_vocab_stride(ref_logits_in);
  const auto outputs = empty_token_stats(policy_logits, targets, policy_metrics);
  if (targets.numel() == 0) return outputs;

  const at::Tensor first_bad_row = at::full({1}, -1, targets.options());
  C10_CUDA_CHECK(launch_token_stats(policy_logits, ref_logits, targets, ignore_index,
                                    token_stats_out(outputs, policy_metrics), first_bad_row));
  // The one device-to-host read and stream synchronization per call (token_stats.cu says
  // what it costs).
  const int64_t bad_row = first_bad_row.item<int64_t>();
  if (bad_row >= 0) fail_bad_label_at(targets, bad_row, vocab, ignore_index);
  return outputs;
}

at::Tensor token_stats_tile_cuda(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                 const at::Tensor& targets, int64_t ignore_index,
                                 int64_t vocab_start, const std::optional<at::Tensor>& state,
                                 bool policy_metrics) {
  const TokenStatsTileInputs in =
      prepare_token_stats_tile_inputs(policy_logits, ref_logits, targets, vocab_start, state,
                                      policy_metrics);
  const c10::cuda::CUDAGuard guard(policy_logits.device());
  at::Tensor state_out = in.empty_state(targets);
  if (targets.numel() == 0) return state_out;
  C10_CUDA_CHECK(launch_token_stats_tile(in.policy_logits, in.ref_logits, targets,
                                         ignore_index, vocab_start, in.policy_metrics,
                                         in.state_in_data(), state_out.data_ptr<float>()));
  return state_out;
}

TokenStatsOutputs token_stats_finish_cuda(
    const at::Tensor& state_in, const at::Tensor& targets, int64_t ignore_index) {
  const at::Tensor state = check_tile_state(state_in, targets);
  const c10::cuda::CUDAGuard guard(state.device());
  const bool policy_metrics = tile_state_has_metrics(state);
  const auto outputs = empty_token_stats(state, targets, policy_metrics);
  if (targets.numel() == 0) return outputs;
  C10_CUDA_CHECK(launch_token_stats_finish(state, targets, ignore_index,
                                           token_stats_out(outputs, policy_metrics)));
  return outputs;
}

at::Tensor token_stats_backward_cuda(const at::Tensor& grad_logp_pol,
                                     const at::Tensor& grad_token_kl,
                                     const at::Tensor& policy_logits,
                                     const at::Tensor& ref_logits, const at::Tensor& targets,
                                     const at::Tensor& lse_pol, const at::Tensor& lse_ref,
                                     int64_t ignore_index, int64_t vocab_start) {
  const TokenStatsBackwardInputs in =
      prepare_token_stats_backward_inputs(grad_logp_pol, grad_token_kl, policy_logits,
                                          ref_logits, targets, lse_pol, lse_ref, vocab_start);
  const c10::cuda::CUDAGuard guard(policy_logits.device());
  at::Tensor grad = in.empty_grad();
  if (targets.numel() == 0) return grad;
  C10_CUDA_CHECK(launch_token_stats_backward(in.grad_logp_pol, in.grad_token_kl,
                                             in.policy_logits, in.ref_logits, targets,
                                             in.lse_pol, in.lse_ref, ignore_index, vocab_start,
                                             grad));
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> preference_loss_cuda(
    const at::Tensor& chosen_logps_margin, const at::Tensor& rejected_logps_margin,
    const at::Tensor& chosen_kl, const at::Tensor& rejected_kl, double beta, double alpha,
    std::string_view variant) {
  const PairInputs in = prepare_pair_inputs(chosen_logps_margin, rejected_logps_margin,
                                            chosen_kl, rejected_kl, beta, variant);
  const c10::cuda::CUDAGuard guard(chosen_logps_margin.device());
  const auto outputs = in.empty_loss_outputs();
  if (in.pairs() == 0) return outputs;
  C10_CUDA_CHECK(launch_preference_loss(in.args(beta, alpha), pair_loss_out(outputs)));
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& chosen_logps_margin,
    const at::Tensor& rejected_logps_margin, const at::Tensor& chosen_kl,
    const at::Tensor& rejected_kl, double beta, double alpha, std::string_view variant) {
  const PairInputs in = prepare_pair_backward_inputs(grad_losses, chosen_logps_margin,
                                                     rejected_logps_margin, chosen_kl,
                                                     rejected_kl, beta, variant);
  const c10::cuda::CUDAGuard guard(chosen_logps_margin.device());
  const auto outputs = in.empty_grad_outputs();
  if (in.pairs() == 0) return outputs;
  C10_CUDA_CHECK(launch_preference_loss_backward(
      in.args(beta, alpha), in.grad_losses.data_ptr<float>(), pair_loss_grad_out(outputs)));
  return outputs;
}

}  // namespace

// The emulated build (emulation/cuda_emulation.h) registers the same implementations as
// CPU ops of a namespace of its own, which `import tdpo_ext` never loads.
#ifdef TDPO_CUDA_EMULATION
#define TDPO_CUDA_OPS_NAMESPACE tdpo_ext_emulated
#define TDPO_CUDA_OPS_DISPATCH_KEY CPU
#else
#define TDPO_CUDA_OPS_NAMESPACE tdpo_ext
#define TDPO_CUDA_OPS_DISPATCH_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(TDPO_CUDA_OPS_NAMESPACE, TDPO_CUDA_OPS_DISPATCH_KEY, m) {
  m.impl("token_stats", &token_stats_cuda);
  m.impl("token_stats_tile", &token_stats_tile_cuda);
  m.impl("token_stats_finish", &token_stats_finish_cuda);
  m.impl("token_stats_backward", &token_stats_backward_cuda);
  m.impl("preference_loss", &preference_loss_cuda);
  m.impl("preference_loss_backward", &preference_loss_backward_cuda);
}

}  // namespace tdpo_ext::cuda
