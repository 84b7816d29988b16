// Every op of tdpo_ext, its schema in one place.
//
// Device implementations register themselves under their dispatch key:
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Fake kernels and autograd are
// registered from Python, beside the public functions (tdpo_ext/ops.py).
#include <torch/library.h>

#include "build_info.h"

TORCH_LIBRARY(tdpo_ext, m) {
  // Per-token statistics of one (N, T, V) logits batch of each model. targets[n, t] is the
  // token that logits[n, t] predicts (already shifted); ignore_index masks it. Each
  // output is (N, T) float32, 0 on masked tokens; lse_* are kept for the backward.
  m.def(
      "token_stats(Tensor policy_logits, Tensor ref_logits, Tensor targets, int ignore_index) "
      "-> (Tensor logp_pol, Tensor logp_ref, Tensor token_kl, Tensor lse_pol, Tensor lse_ref)");
  // token_stats of rows that arrive in tiles of vocabulary columns (the fused LM head
  // computes the logits a tile at a time). token_stats_tile folds the tile of columns
  // [vocab_start, vocab_start + V) of each token's row into its running state
  // ((N, T, kTileStateFloats) float32, csrc/tdpo_math.h: the softmax state of both models
  // and the two label logits; None before the first tile); token_stats_finish turns the
  // state of whole rows into token_stats' five outputs. Labels must lie in [0, whole V): a tile cannot check them;
  // a label that no tile held gives NaN.
  m.def(
      "token_stats_tile(Tensor policy_logits, Tensor ref_logits, Tensor targets, "
      "int ignore_index, int vocab_start, Tensor? state) -> Tensor state_out");
  m.def(
      "token_stats_finish(Tensor state, Tensor targets, int ignore_index) "
      "-> (Tensor logp_pol, Tensor logp_ref, Tensor token_kl, Tensor lse_pol, Tensor lse_ref)");
  // d loss / d policy_logits from the upstream gradients of logp_pol and token_kl:
  // grad_logp * (onehot(y) - p_pol) + grad_kl * (p_pol - p_ref), contiguous, policy dtype.
  // The logits may be the tile of columns [vocab_start, vocab_start + V) of rows whose
  // logsumexps are lse_pol and lse_ref; the onehot term goes to the tile holding the label.
  // Labels are trusted (token_stats checked them). A token whose grad_token_kl is 0 never
  // reads its ref_logits row.
  m.def(
      "token_stats_backward(Tensor grad_logp_pol, Tensor grad_token_kl, Tensor policy_logits, "
      "Tensor ref_logits, Tensor targets, Tensor lse_pol, Tensor lse_ref, int ignore_index, "
      "int vocab_start=0) -> Tensor grad_policy_logits");
  // Pairwise loss per pair (float32 (B,) inputs); variant is one of kVariantNames
  // (csrc/tdpo_math.h).
  m.def(
      "preference_loss(Tensor chosen_logps_margin, Tensor rejected_logps_margin, "
      "Tensor chosen_kl, Tensor rejected_kl, float beta, float alpha, str variant) "
      "-> (Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards)");
  m.def(
      "preference_loss_backward(Tensor grad_losses, Tensor chosen_logps_margin, "
      "Tensor rejected_logps_margin, Tensor chosen_kl, Tensor rejected_kl, float beta, "
      "float alpha, str variant) -> (Tensor grad_chosen_logps_margin, "
      "Tensor grad_rejected_logps_margin, Tensor grad_chosen_kl, Tensor grad_rejected_kl)");
  // Build facts as ops too, so that a library loaded with torch.ops.load_library (the
  // CMake build) answers them without Python bindings.
  m.def("built_with_cuda() -> bool", [] { return tdpo_ext::built_with_cuda(); });
  m.def("cpu_kernel_capability() -> str", [] { return tdpo_ext::cpu_kernel_capability(); });
}
