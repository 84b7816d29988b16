#include "checks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>

namespace tdpo_ext {

namespace {

// The checks of labels that need no logits: (N, T) int64.
void check_labels(const at::Tensor& targets) {
  TORCH_CHECK(targets.dim() == 2, "tdpo_ext: labels must have shape (N, T), got ",
              targets.sizes());
  TORCH_CHECK(!at::isFloatingType(targets.scalar_type()) && !targets.is_complex() &&
                  targets.scalar_type() != at::kBool,
              "tdpo_ext: labels must be an integer tensor (int64), got ", targets.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "tdpo_ext: labels must be int64, got ",
              targets.scalar_type());
}

}  // namespace

int64_t check_token_stats_inputs(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                 const at::Tensor& targets) {
  TORCH_CHECK(policy_logits.dim() == 3,
              "tdpo_ext: policy_logits must have shape (N, T, V), got ", policy_logits.sizes());
  TORCH_CHECK(ref_logits.dim() == 3,
              "tdpo_ext: ref_logits must have shape (N, T, V), got ", ref_logits.sizes());
  check_labels(targets);
  TORCH_CHECK(at::isFloatingType(policy_logits.scalar_type()) &&
                  policy_logits.scalar_type() != at::kDouble,
              "tdpo_ext: policy_logits must be float32, bfloat16 or float16, got ",
              policy_logits.scalar_type());
  TORCH_CHECK(at::isFloatingType(ref_logits.scalar_type()) &&
                  ref_logits.scalar_type() != at::kDouble,
              "tdpo_ext: ref_logits must be float32, bfloat16 or float16, got ",
              ref_logits.scalar_type());
  TORCH_CHECK(policy_logits.device() == ref_logits.device() &&
                  policy_logits.device() == targets.device(),
              "tdpo_ext: policy_logits, ref_logits and labels must be on one device, got ",
              policy_logits.device(), ", ", ref_logits.device(), " and ", targets.device());
  TORCH_CHECK(policy_logits.size(2) == ref_logits.size(2),
              "tdpo_ext: vocabulary mismatch: policy_logits has V=", policy_logits.size(2),
              " but ref_logits has V=", ref_logits.size(2));
  TORCH_CHECK(policy_logits.sizes() == ref_logits.sizes(),
              "tdpo_ext: ref_logits shape ", ref_logits.sizes(),
              " does not match policy_logits shape ", policy_logits.sizes());
  TORCH_CHECK(policy_logits.size(0) == targets.size(0) &&
                  policy_logits.size(1) == targets.size(1),
              "tdpo_ext: labels shape ", targets.sizes(),
              " does not match the (N, T) of policy_logits ", policy_logits.sizes());
  TORCH_CHECK(policy_logits.size(1) >= 1, "tdpo_ext: sequence length T must be at least 1");
  TORCH_CHECK(policy_logits.size(2) >= 1, "tdpo_ext: vocabulary size V must be at least 1");
  return policy_logits.size(2);
}

namespace {

void check_pair_inputs(const at::Tensor& chosen_logps_margin,
                       const at::Tensor& rejected_logps_margin, const at::Tensor& chosen_kl,
                       const at::Tensor& rejected_kl, double beta) {
  TORCH_CHECK(beta > 0, "tdpo_ext: beta must be > 0, got ", beta);
  const at::Tensor* tensors[] = {&chosen_logps_margin, &rejected_logps_margin, &chosen_kl,
                                 &rejected_kl};
  const char* names[] = {"chosen_logps_margin", "rejected_logps_margin", "chosen_kl",
                         "rejected_kl"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *tensors[i];
    TORCH_CHECK(t.dim() == 1, "tdpo_ext: ", names[i], " must be 1-D (one value per pair), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "tdpo_ext: ", names[i], " must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.size(0) == chosen_logps_margin.size(0), "tdpo_ext: ", names[i], " has ",
                t.size(0), " pairs but chosen_logps_margin has ", chosen_logps_margin.size(0));
    TORCH_CHECK(t.device() == chosen_logps_margin.device(), "tdpo_ext: ", names[i], " is on ",
                t.device(), " but chosen_logps_margin is on ", chosen_logps_margin.device());
  }
}

Variant parse_variant(std::string_view variant) {
  std::string expected;
  for (size_t i = 0; i < kVariantNames.size(); ++i) {
    if (variant == kVariantNames[i]) return static_cast<Variant>(i);
    expected += (i ? ", '" : "'") + std::string(kVariantNames[i]) + "'";
  }
  TORCH_CHECK(false, "tdpo_ext: unknown variant '", std::string(variant), "'; expected one of ",
              expected);
}

}  // namespace

TokenStatsBackwardInputs prepare_token_stats_backward_inputs(
    const at::Tensor& grad_logp_pol, const at::Tensor& grad_token_kl,
    const at::Tensor& policy_logits, const at::Tensor& ref_logits, const at::Tensor& targets,
    const at::Tensor& lse_pol, const at::Tensor& lse_ref, int64_t vocab_start) {
  check_token_stats_inputs(policy_logits, ref_logits, targets);
  TORCH_CHECK(vocab_start >= 0, "tdpo_ext: vocab_start must be >= 0, got ", vocab_start);
  const at::Tensor* tensors[] = {&grad_logp_pol, &grad_token_kl, &lse_pol, &lse_ref};
  const char* names[] = {"grad_logp_pol", "grad_token_kl", "lse_pol", "lse_ref"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *tensors[i];
    TORCH_CHECK(t.sizes() == targets.sizes(), "tdpo_ext: ", names[i],
                " must have the (N, T) shape ", targets.sizes(), " of labels, got ", t.sizes());
    TORCH_CHECK(t.device() == targets.device(), "tdpo_ext: ", names[i], " is on ", t.device(),
                " but labels are on ", targets.device());
  }
  return {grad_logp_pol.to(at::kFloat).contiguous(), grad_token_kl.to(at::kFloat).contiguous(),
          with_unit_vocab_stride(policy_logits), with_unit_vocab_stride(ref_logits),
          lse_pol.contiguous(), lse_ref.contiguous()};
}

at::Tensor TokenStatsBackwardInputs::empty_grad() const {
  return at::empty(policy_logits.sizes(), policy_logits.options());
}

TokenStatsTileInputs prepare_token_stats_tile_inputs(const at::Tensor& policy_logits,
                                                     const at::Tensor& ref_logits,
                                                     const at::Tensor& targets,
                                                     int64_t vocab_start,
                                                     const std::optional<at::Tensor>& state,
                                                     bool policy_metrics) {
  check_token_stats_inputs(policy_logits, ref_logits, targets);
  TORCH_CHECK(vocab_start >= 0, "tdpo_ext: vocab_start must be >= 0, got ", vocab_start);
  at::Tensor state_in;
  if (state.has_value()) {
    state_in = check_tile_state(*state, targets);
    TORCH_CHECK(tile_state_has_metrics(state_in) == policy_metrics,
                "tdpo_ext: state has ", state_in.size(2), " floats per token, but "
                "policy_metrics=", policy_metrics ? "True" : "False", " needs ",
                policy_metrics ? kTileStateWithMetricsFloats : kTileStateFloats,
                ": every tile of a row must be folded with the same policy_metrics");
  }
  return {with_unit_vocab_stride(policy_logits), with_unit_vocab_stride(ref_logits), state_in,
          policy_metrics};
}

int64_t TokenStatsTileInputs::state_floats() const {
  return policy_metrics ? kTileStateWithMetricsFloats : kTileStateFloats;
}

at::Tensor TokenStatsTileInputs::empty_state(const at::Tensor& targets) const {
  return at::empty({targets.size(0), targets.size(1), state_floats()},
                   policy_logits.options().dtype(at::kFloat));
}

at::Tensor check_tile_state(const at::Tensor& state, const at::Tensor& targets) {
  check_labels(targets);
  TORCH_CHECK(state.dim() == 3 && state.size(0) == targets.size(0) &&
                  state.size(1) == targets.size(1) &&
                  (state.size(2) == kTileStateFloats ||
                   state.size(2) == kTileStateWithMetricsFloats),
              "tdpo_ext: state must have shape (N, T, ", kTileStateFloats, ") or (N, T, ",
              kTileStateWithMetricsFloats, ") with the (N, T) of labels ", targets.sizes(),
              ", got ", state.sizes());
  TORCH_CHECK(state.scalar_type() == at::kFloat, "tdpo_ext: state must be float32, got ",
              state.scalar_type());
  TORCH_CHECK(state.device() == targets.device(), "tdpo_ext: state is on ", state.device(),
              " but labels are on ", targets.device());
  return state.contiguous();
}

bool tile_state_has_metrics(const at::Tensor& state) {
  return state.size(2) == kTileStateWithMetricsFloats;
}

PairInputs prepare_pair_inputs(const at::Tensor& chosen_logps_margin,
                               const at::Tensor& rejected_logps_margin,
                               const at::Tensor& chosen_kl, const at::Tensor& rejected_kl,
                               double beta, std::string_view variant) {
  check_pair_inputs(chosen_logps_margin, rejected_logps_margin, chosen_kl, rejected_kl, beta);
  return {chosen_logps_margin.contiguous(), rejected_logps_margin.contiguous(),
          chosen_kl.contiguous(), rejected_kl.contiguous(), parse_variant(variant)};
}

PairInputs prepare_pair_backward_inputs(const at::Tensor& grad_losses,
                                        const at::Tensor& chosen_logps_margin,
                                        const at::Tensor& rejected_logps_margin,
                                        const at::Tensor& chosen_kl,
                                        const at::Tensor& rejected_kl, double beta,
                                        std::string_view variant) {
  PairInputs in = prepare_pair_inputs(chosen_logps_margin, rejected_logps_margin, chosen_kl,
                                      rejected_kl, beta, variant);
  TORCH_CHECK(grad_losses.numel() == in.pairs() &&
                  grad_losses.device() == chosen_logps_margin.device(),
              "tdpo_ext: grad_losses must hold one value per pair (", in.pairs(), ") on ",
              chosen_logps_margin.device(), ", got shape ", grad_losses.sizes(), " on ",
              grad_losses.device());
  in.grad_losses = grad_losses.to(at::kFloat).contiguous();
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> PairInputs::empty_loss_outputs() const {
  return {at::empty_like(chosen_margin), at::empty_like(chosen_margin),
          at::empty_like(chosen_margin)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> PairInputs::empty_grad_outputs()
    const {
  return {at::empty_like(chosen_margin), at::empty_like(chosen_margin),
          at::empty_like(chosen_margin), at::empty_like(chosen_margin)};
}

PairLossOut pair_loss_out(const std::tuple<at::Tensor, at::Tensor, at::Tensor>& outputs) {
  return {std::get<0>(outputs).data_ptr<float>(), std::get<1>(outputs).data_ptr<float>(),
          std::get<2>(outputs).data_ptr<float>()};
}

PairLossGradOut pair_loss_grad_out(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& outputs) {
  return {std::get<0>(outputs).data_ptr<float>(), std::get<1>(outputs).data_ptr<float>(),
          std::get<2>(outputs).data_ptr<float>(), std::get<3>(outputs).data_ptr<float>()};
}

PairArgs PairInputs::args(double beta, double alpha) const {
  return {chosen_margin.data_ptr<float>(), rejected_margin.data_ptr<float>(),
          chosen_kl.data_ptr<float>(),     rejected_kl.data_ptr<float>(),
          pairs(),                         static_cast<float>(beta),
          static_cast<float>(alpha),       variant};
}

TokenStatsOutputs empty_token_stats(const at::Tensor& policy_logits, const at::Tensor& targets,
                                    bool policy_metrics) {
  const auto opts = policy_logits.options().dtype(at::kFloat);
  const auto shape = targets.sizes();
  const auto metric = [&](at::ScalarType dtype) {
    return policy_metrics ? at::empty(shape, opts.dtype(dtype)) : at::empty({0}, opts.dtype(dtype));
  };
  return {at::empty(shape, opts), at::empty(shape, opts), at::empty(shape, opts),
          at::empty(shape, opts), at::empty(shape, opts), metric(at::kFloat),
          metric(at::kFloat),     metric(at::kBool)};
}

TokenStatsOut token_stats_out(const TokenStatsOutputs& outputs, bool policy_metrics) {
  TokenStatsOut out{std::get<0>(outputs).data_ptr<float>(),
                    std::get<1>(outputs).data_ptr<float>(),
                    std::get<2>(outputs).data_ptr<float>(),
                    std::get<3>(outputs).data_ptr<float>(),
                    std::get<4>(outputs).data_ptr<float>()};
  if (policy_metrics) {
    out.entropy = std::get<5>(outputs).data_ptr<float>();
    out.logit_mean = std::get<6>(outputs).data_ptr<float>();
    out.label_is_argmax = std::get<7>(outputs).data_ptr<bool>();
  }
  return out;
}

at::Tensor with_unit_vocab_stride(const at::Tensor& logits) {
  return logits.stride(2) == 1 || logits.size(2) == 1 ? logits : logits.contiguous();
}

std::string bad_label_message(int64_t row, int64_t position, int64_t label, int64_t vocab,
                              int64_t ignore_index) {
  return c10::str("tdpo_ext: labels holds ", label, " at row ", row,
                  " (predicted by logits position ", position, "), outside the vocabulary [0, ",
                  vocab, ") and not ignore_index (", ignore_index, ")");
}

void fail_bad_label(int64_t row, int64_t position, int64_t label, int64_t vocab,
                    int64_t ignore_index) {
  TORCH_CHECK(false, bad_label_message(row, position, label, vocab, ignore_index));
}

void fail_bad_label_at(const at::Tensor& targets, int64_t flat_index, int64_t vocab,
                       int64_t ignore_index) {
  const int64_t n = flat_index / targets.size(1), t = flat_index % targets.size(1);
  fail_bad_label(n, t, targets.select(0, n).select(0, t).item<int64_t>(), vocab, ignore_index);
}

}  // namespace tdpo_ext
