// Input validation shared by the CPU and CUDA implementations, so that both devices
// reject bad input with the same message, naming the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "tdpo_math.h"

namespace tdpo_ext {

// policy_logits and ref_logits (N, T, V) floating, targets (N, T) integer, all on one
// device. Returns V.
int64_t check_token_stats_inputs(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                 const at::Tensor& targets);

// token_stats_backward's inputs as both devices' implementations start from them: all
// checked (the per-token tensors must have the (N, T) shape and device of targets, or a
// short one would be read past its end), the logits with a unit vocabulary stride, the
// per-token tensors dense float32 (upstream gradients may arrive expanded or strided).
struct TokenStatsBackwardInputs {
  at::Tensor grad_logp_pol, grad_token_kl, policy_logits, ref_logits, lse_pol, lse_ref;

  // The (N, T, V) gradient to fill: contiguous, in the policy dtype.
  at::Tensor empty_grad() const;
};

TokenStatsBackwardInputs prepare_token_stats_backward_inputs(
    const at::Tensor& grad_logp_pol, const at::Tensor& grad_token_kl,
    const at::Tensor& policy_logits, const at::Tensor& ref_logits, const at::Tensor& targets,
    const at::Tensor& lse_pol, const at::Tensor& lse_ref, int64_t vocab_start);

// token_stats_tile's inputs as both devices' implementations start from them: the logits
// and labels checked as for token_stats, vocab_start >= 0, and the state of the columns
// before the tile, if any, checked (see check_tile_state: with the policy metrics' floats
// exactly when policy_metrics) and contiguous.
struct TokenStatsTileInputs {
  at::Tensor policy_logits, ref_logits;
  at::Tensor state_in;  // undefined for the first tile
  bool policy_metrics;

  // Floats per token in the state: kTileStateFloats, or kTileStateWithMetricsFloats.
  int64_t state_floats() const;
  // The (N, T, state_floats()) float32 state to fill, on the logits' device.
  at::Tensor empty_state(const at::Tensor& targets) const;
  const float* state_in_data() const {
    return state_in.defined() ? state_in.data_ptr<float>() : nullptr;
  }
};

TokenStatsTileInputs prepare_token_stats_tile_inputs(const at::Tensor& policy_logits,
                                                     const at::Tensor& ref_logits,
                                                     const at::Tensor& targets,
                                                     int64_t vocab_start,
                                                     const std::optional<at::Tensor>& state,
                                                     bool policy_metrics);

// A token_stats_tile state for token_stats_finish: (N, T, kTileStateFloats) float32, or
// (N, T, kTileStateWithMetricsFloats) with the policy metrics, on the device of targets
// (N, T). Returns it contiguous.
at::Tensor check_tile_state(const at::Tensor& state, const at::Tensor& targets);

// Whether a checked tile state holds the policy metrics' floats.
bool tile_state_has_metrics(const at::Tensor& state);

// The pairwise loss's inputs as both devices' implementations start from them: the four
// per-row tensors checked (float32, 1-D, same length and device; beta > 0) and made
// contiguous, and the variant parsed.
struct PairInputs {
  at::Tensor chosen_margin, rejected_margin, chosen_kl, rejected_kl;
  Variant variant;
  // preference_loss_backward's upstream gradient, one float32 per pair (undefined in the
  // forward).
  at::Tensor grad_losses;

  int64_t pairs() const { return chosen_margin.size(0); }
  // The forward's (losses, chosen_rewards, rejected_rewards) and the backward's four
  // gradients (margins, then KLs; chosen, then rejected): (B,) float32 each, on the pairs'
  // device.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_loss_outputs() const;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_grad_outputs() const;
  // The kernels' view of these inputs (pointers valid while this object lives).
  PairArgs args(double beta, double alpha) const;
};

PairInputs prepare_pair_inputs(const at::Tensor& chosen_logps_margin,
                               const at::Tensor& rejected_logps_margin,
                               const at::Tensor& chosen_kl, const at::Tensor& rejected_kl,
                               double beta, std::string_view variant);

// The same with grad_losses checked (one value per pair, on the pairs' device) and set.
PairInputs prepare_pair_backward_inputs(const at::Tensor& grad_losses,
                                        const at::Tensor& chosen_logps_margin,
                                        const at::Tensor& rejected_logps_margin,
                                        const at::Tensor& chosen_kl,
                                        const at::Tensor& rejected_kl, double beta,
                                        std::string_view variant);

// The kernels' view of those outputs (pointers valid while the tensors live).
PairLossOut pair_loss_out(const std::tuple<at::Tensor, at::Tensor, at::Tensor>& outputs);
PairLossGradOut pair_loss_grad_out(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& outputs);

// The eight outputs of token_stats and token_stats_finish: (logp_pol, logp_ref, token_kl,
// lse_pol, lse_ref, entropy, logit_mean, label_is_argmax).
using TokenStatsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Those outputs allocated on the device of policy_logits (or of any tensor passed in its
// place) for either implementation to fill: the first five (N, T) float32; with
// policy_metrics also entropy, logit_mean ((N, T) float32) and label_is_argmax ((N, T)
// bool), otherwise those three are empty (0,) tensors.
TokenStatsOutputs empty_token_stats(const at::Tensor& policy_logits, const at::Tensor& targets,
                                    bool policy_metrics);

// The same outputs as the kernels' view of them (pointers valid while they live; the
// metrics pointers null without policy_metrics).
TokenStatsOut token_stats_out(const TokenStatsOutputs& outputs, bool policy_metrics);

// The kernels address logits as (row, position, vocab) with a unit vocabulary stride;
// views such as logits[:, :-1] qualify as they are. Anything else is copied once.
at::Tensor with_unit_vocab_stride(const at::Tensor& logits);

// The message for a label outside [0, V) that is not ignore_index, at targets[row,
// position]: raised by both devices' ops, and by the Python code that checks labels
// itself (exported as tdpo_ext._C.bad_label_message).
std::string bad_label_message(int64_t row, int64_t position, int64_t label, int64_t vocab,
                              int64_t ignore_index);
[[noreturn]] void fail_bad_label(int64_t row, int64_t position, int64_t label, int64_t vocab,
                                 int64_t ignore_index);

// The same error for the label at flat index n * T + t of targets (N, T): what the
// token_stats kernels of both devices record, the smallest bad index (smallest row, then
// smallest position), so that both name the same label whatever the order of their work.
[[noreturn]] void fail_bad_label_at(const at::Tensor& targets, int64_t flat_index,
                                    int64_t vocab, int64_t ignore_index);

}  // namespace tdpo_ext
