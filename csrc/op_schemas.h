// The schemas of tdpo_ext's device ops, written once: csrc/torch_bindings.cpp defines them
// under tdpo_ext, csrc/cuda/emulation/emulated_ops.cpp under tdpo_ext_emulated (the CUDA
// kernels run on the CPU for the tests), and csrc/no_cuda_kernels.cpp gives each a CUDA
// implementation that refuses, in builds without the CUDA kernels.
#pragma once

#include <torch/library.h>

#include <array>
#include <string>
#include <string_view>

namespace tdpo_ext {

inline constexpr std::array<std::string_view, 6> kDeviceOpSchemas = {
    // Per-token statistics of one (N, T, V) logits batch of each model. targets[n, t] is
    // the token that logits[n, t] predicts (already shifted); ignore_index masks it. Each
    // output is (N, T) float32, 0 on masked tokens; lse_* are kept for the backward. With
    // policy_metrics, also the policy's entropy, logit_mean ((N, T) float32) and
    // label_is_argmax ((N, T) bool) of each token (PolicyMetrics, csrc/tdpo_math.h; 0 and
    // false where masked); without, those three are empty (0,) tensors and are not
    // computed.
    "token_stats(Tensor policy_logits, Tensor ref_logits, Tensor targets, int ignore_index, "
    "bool policy_metrics=False) -> (Tensor logp_pol, Tensor logp_ref, Tensor token_kl, "
    "Tensor lse_pol, Tensor lse_ref, Tensor entropy, Tensor logit_mean, "
    "Tensor label_is_argmax)",
    // token_stats of rows that arrive in tiles of vocabulary columns (the fused LM head
    // computes the logits a tile at a time). token_stats_tile folds the tile of columns
    // [vocab_start, vocab_start + V) of each token's row into its running state
    // ((N, T, kTileStateFloats) float32, csrc/tdpo_math.h: the softmax state of both
    // models and the two label logits; None before the first tile); token_stats_finish
    // turns the state of whole rows into token_stats' five outputs. Labels must lie in
    // [0, whole V): a tile cannot check them; a label that no tile held gives NaN. With
    // policy_metrics the state also holds each token's PolicyMetricsState
    // (kTileStateWithMetricsFloats floats per token; every tile of a row must agree), and
    // token_stats_finish, given such a state, returns the metrics too.
    "token_stats_tile(Tensor policy_logits, Tensor ref_logits, Tensor targets, "
    "int ignore_index, int vocab_start, Tensor? state, bool policy_metrics=False) "
    "-> Tensor state_out",
    "token_stats_finish(Tensor state, Tensor targets, int ignore_index) "
    "-> (Tensor logp_pol, Tensor logp_ref, Tensor token_kl, Tensor lse_pol, Tensor lse_ref, "
    "Tensor entropy, Tensor logit_mean, Tensor label_is_argmax)",
    // d loss / d policy_logits from the upstream gradients of logp_pol and token_kl:
    // grad_logp * (onehot(y) - p_pol) + grad_kl * (p_pol - p_ref), contiguous, policy
    // dtype. The logits may be the tile of columns [vocab_start, vocab_start + V) of rows
    // whose logsumexps are lse_pol and lse_ref; the onehot term goes to the tile holding
    // the label. Labels are trusted (token_stats checked them). A token whose
    // grad_token_kl is 0 never reads its ref_logits row.
    "token_stats_backward(Tensor grad_logp_pol, Tensor grad_token_kl, Tensor policy_logits, "
    "Tensor ref_logits, Tensor targets, Tensor lse_pol, Tensor lse_ref, int ignore_index, "
    "int vocab_start=0) -> Tensor grad_policy_logits",
    // Pairwise loss per pair (float32 (B,) inputs); variant is one of kVariantNames
    // (csrc/tdpo_math.h).
    "preference_loss(Tensor chosen_logps_margin, Tensor rejected_logps_margin, "
    "Tensor chosen_kl, Tensor rejected_kl, float beta, float alpha, str variant) "
    "-> (Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards)",
    "preference_loss_backward(Tensor grad_losses, Tensor chosen_logps_margin, "
    "Tensor rejected_logps_margin, Tensor chosen_kl, Tensor rejected_kl, float beta, "
    "float alpha, str variant) -> (Tensor grad_chosen_logps_margin, "
    "Tensor grad_rejected_logps_margin, Tensor grad_chosen_kl, Tensor grad_rejected_kl)",
};

// The op's name in its schema: what precedes the argument list.
inline std::string op_name(std::string_view schema) {
  return std::string(schema.substr(0, schema.find('(')));
}

// Defines every device op in the library m (TORCH_LIBRARY(namespace, m)).
inline void define_device_ops(torch::Library& m) {
  for (const std::string_view schema : kDeviceOpSchemas) m.def(std::string(schema).c_str());
}

}  // namespace tdpo_ext
