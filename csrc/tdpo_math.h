// The TDPO formulas, written once for the CPU and CUDA kernels alike.
//
// Every helper is scalar float math marked TDPO_HD so that csrc/cpu/ and csrc/cuda/
// call the same definition. Vectorized CPU loops only evaluate exp() in bulk; the
// softmax-state merge, the token KL, the gradient coefficients and the pairwise
// loss all live here.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TDPO_HD __host__ __device__ __forceinline__
#else
#define TDPO_HD inline
#endif

namespace tdpo_ext {

// Running softmax statistics of one vocabulary row of both models, each model's sums
// taken in the frame of its running maximum, s_pol = exp_shift(max_pol) and
// s_ref = exp_shift(max_ref):
//   sum_pol      = sum_v exp(x_v - s_pol)
//   sum_ref      = sum_v exp(r_v - s_ref)
//   ref_diff_sum = sum_v exp(r_v - s_ref) * ((r_v - s_ref) - (x_v - s_pol))
// where x are the policy logits and r the reference logits. KL(ref || pol) follows from
// these without a second pass: KL = ref_diff_sum / sum_ref - log(sum_ref) + log(sum_pol)
// (token_kl_of). Every term there has the size of the KL and of log(V), whatever the
// size of the logits: a constant added to a row (which leaves its distribution unchanged)
// cancels in each difference before it is rounded, where lse_ref - lse_pol would round
// both logsumexps on the scale of the logits first.
struct SoftmaxPairState {
  float max_pol;
  float sum_pol;
  float max_ref;
  float sum_ref;
  float ref_diff_sum;
};

TDPO_HD SoftmaxPairState empty_state() {
  return {-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
}

// exp(old_max - new_max) without the NaN that -inf - -inf would give for an
// empty (all -inf) partial state.
TDPO_HD float rescale_factor(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.f : expf(old_max - new_max);
}

// The shift for exp(v - shift) over a chunk whose maximum is chunk_max: the maximum
// itself, or 0 for an all -inf chunk, whose elements then give exp(-inf) = 0 instead of
// exp(-inf - -inf) = NaN; merge_states later discards that chunk's empty state.
TDPO_HD float exp_shift(float chunk_max) { return chunk_max == -INFINITY ? 0.f : chunk_max; }

// The gap between the two models' frames, s_ref - s_pol. Both shifts are maxima of
// nearby logits for nearby models, so the difference is exact or rounded on the scale of
// the gap, not of the logits.
TDPO_HD float frame_gap(float max_pol, float max_ref) {
  return exp_shift(max_ref) - exp_shift(max_pol);
}

// One element's contribution to ref_diff_sum in a frame whose gap is `gap`:
// exp(r - s_ref) * ((r - s_ref) - (x - s_pol)), written as (r - x) - gap so that each
// difference is rounded on the scale of the models' difference. A reference probability
// of exactly 0 contributes 0 even where both logits are -inf (whose difference is NaN):
// the KL term q log(q/p) is 0 when q is 0.
TDPO_HD float ref_diff_term(float ref_exp, float ref_logit, float pol_logit, float gap) {
  return ref_exp == 0.f ? 0.f : ref_exp * ((ref_logit - pol_logit) - gap);
}

// a's ref_diff_sum moved into the frame of the maxima (max_pol, max_ref) and rescaled by
// ref_scale = exp(a.max_ref - max_ref): every element's (r - s_ref) - (x - s_pol) changes
// by the change of the gap between the frames. An empty part (sum_ref = 0) gives 0.
TDPO_HD float rebased_ref_diff_sum(const SoftmaxPairState& a, float max_pol, float max_ref,
                                   float ref_scale) {
  const float gap_change = frame_gap(a.max_pol, a.max_ref) - frame_gap(max_pol, max_ref);
  return ref_scale * (a.ref_diff_sum + a.sum_ref * gap_change);
}

// a_sum * a_scale + b_sum * b_scale, rounded as written here rather than as the compiler
// may contract it (a * b + c into an fma), which it is free to do for one model's sum and
// not for the other's: identical models then get bitwise equal sums, and a KL of exactly 0.
TDPO_HD float rescaled_sum(float a_sum, float a_scale, float b_sum, float b_scale) {
  return fmaf(a_sum, a_scale, b_sum * b_scale);
}

// Combines two partial states (for instance two vocabulary chunks, two SIMD lanes or
// two CUDA threads) into the state of their union.
TDPO_HD SoftmaxPairState merge_states(const SoftmaxPairState& a, const SoftmaxPairState& b) {
  SoftmaxPairState out;
  out.max_pol = fmaxf(a.max_pol, b.max_pol);
  out.sum_pol = rescaled_sum(a.sum_pol, rescale_factor(a.max_pol, out.max_pol), b.sum_pol,
                             rescale_factor(b.max_pol, out.max_pol));
  out.max_ref = fmaxf(a.max_ref, b.max_ref);
  const float scale_a = rescale_factor(a.max_ref, out.max_ref);
  const float scale_b = rescale_factor(b.max_ref, out.max_ref);
  out.sum_ref = rescaled_sum(a.sum_ref, scale_a, b.sum_ref, scale_b);
  out.ref_diff_sum = rebased_ref_diff_sum(a, out.max_pol, out.max_ref, scale_a) +
                     rebased_ref_diff_sum(b, out.max_pol, out.max_ref, scale_b);
  return out;
}

// KL(ref || pol) of a row's state: E_q[(r - s_ref) - (x - s_pol)] - log(sum_ref) +
// log(sum_pol) = sum_v q_v (log q_v - log p_v), the two logs taken as one of their ratio
// (a row's sums lie in [1, V]: its maximum contributes exp(0) = 1). The KL is >= 0
// (Gibbs' inequality); a negative result is rounding error, and 0 is nearer the true
// value than it, so it becomes 0 (NaN stays NaN).
TDPO_HD float token_kl_of(const SoftmaxPairState& s) {
  const float kl = s.ref_diff_sum / s.sum_ref + logf(s.sum_pol / s.sum_ref);
  return kl < 0.f ? 0.f : kl;
}

// Per-token results of the forward pass.
struct TokenStats {
  float logp_pol;  // log pi_theta(y | prefix)
  float logp_ref;  // log pi_ref(y | prefix)
  float token_kl;  // KL(pi_ref(.|prefix) || pi_theta(.|prefix))
  float lse_pol;   // logsumexp of the policy row, kept for the backward
  float lse_ref;   // logsumexp of the reference row, kept for the backward
};

TDPO_HD TokenStats finish_token_stats(const SoftmaxPairState& s, float pol_label_logit,
                                      float ref_label_logit) {
  TokenStats out;
  out.lse_pol = s.max_pol + logf(s.sum_pol);
  out.lse_ref = s.max_ref + logf(s.sum_ref);
  out.logp_pol = pol_label_logit - out.lse_pol;
  out.logp_ref = ref_label_logit - out.lse_ref;
  out.token_kl = token_kl_of(s);
  return out;
}

// ---------------------------------------------------------------------------------
// The policy's per-token diversity metrics: token_stats' optional outputs (off unless
// asked for, so that a kernel compiled without them does none of this work). They are
// those of TRL's DPOTrainer (trl/kernels/chunked_logprob.py), computed in the same pass:
//   entropy         = H(pi_theta(.|prefix)) = lse_pol - E_p[x], in nats
//   logit_mean      = sum_v x_v / V
//   label_is_argmax = the label is torch.argmax of the policy row, the first column
//                     holding the row's maximum: x_y >= max_pol and x_y > the maximum
//                     of the columns before the label (TRL's is_top1).
// Their running state over a row's columns, kept beside the SoftmaxPairState whose
// policy frame s_pol = exp_shift(max_pol) it shares:
//   centered_sum     = sum_v exp(x_v - s_pol) * (x_v - s_pol)
//   logit_sum        = sum_v x_v
//   columns          = how many columns were folded in (exact in float below 2^24)
//   max_before_label = max of x_v over the columns before the label's (-inf if none):
//                      for a part of a row (a chunk, a tile) whose label sits at column
//                      label_col counted from the part's first, the part's columns
//                      [0, clamp(label_col, 0, len))
// entropy = log(sum_pol) - centered_sum / sum_pol: each term has the size of log(V), not
// of the logits, so a constant added to a row cancels before it is rounded (TRL's
// sum_v exp(x_v - max) * x_v carries the logits' size).
struct PolicyMetricsState {
  float centered_sum;
  float logit_sum;
  float columns;
  float max_before_label;
};

TDPO_HD PolicyMetricsState empty_metrics_state() { return {0.f, 0.f, 0.f, -INFINITY}; }

// One policy element's contribution to centered_sum, pol_exp = exp(x - s_pol) and
// pol_centered = x - s_pol: a probability of exactly 0 contributes 0, also where x is
// -inf (whose 0 * -inf is NaN).
TDPO_HD float centered_term(float pol_exp, float pol_centered) {
  return pol_exp == 0.f ? 0.f : pol_exp * pol_centered;
}

// A part's centered_sum moved from its frame (its policy maximum max_pol, sum sum_pol)
// into the frame of max_out >= max_pol:
//   sum exp(x - s') (x - s') = exp(s - s') * (sum exp(x - s) (x - s) + (s - s') * sum_pol)
// An empty part (sum_pol = 0, centered_sum = 0) gives 0.
TDPO_HD float rebased_centered_sum(float centered_sum, float sum_pol, float max_pol,
                                   float max_out) {
  return rescale_factor(max_pol, max_out) *
         (centered_sum + sum_pol * (exp_shift(max_pol) - exp_shift(max_out)));
}

// The metrics state of the union of two parts, sa and sb being their softmax states (the
// merged softmax state is merge_states(sa, sb)). Every field merges in any order:
// max_before_label is a maximum, columns and logit_sum sums, centered_sum a rescaled sum.
TDPO_HD PolicyMetricsState merge_metrics(const SoftmaxPairState& sa, const PolicyMetricsState& a,
                                         const SoftmaxPairState& sb,
                                         const PolicyMetricsState& b) {
  const float max_out = fmaxf(sa.max_pol, sb.max_pol);
  return {rebased_centered_sum(a.centered_sum, sa.sum_pol, sa.max_pol, max_out) +
              rebased_centered_sum(b.centered_sum, sb.sum_pol, sb.max_pol, max_out),
          a.logit_sum + b.logit_sum, a.columns + b.columns,
          fmaxf(a.max_before_label, b.max_before_label)};
}

struct PolicyMetrics {
  float entropy;
  float logit_mean;
  bool label_is_argmax;
};

// The metrics of a whole row from its states and its label's policy logit. The entropy
// is >= 0; a negative result is rounding error, and 0 is nearer the true value (NaN
// stays NaN).
TDPO_HD PolicyMetrics finish_policy_metrics(const SoftmaxPairState& s,
                                            const PolicyMetricsState& m,
                                            float pol_label_logit) {
  const float entropy = logf(s.sum_pol) - m.centered_sum / s.sum_pol;
  return {entropy < 0.f ? 0.f : entropy, m.logit_sum / m.columns,
          pol_label_logit >= s.max_pol && pol_label_logit > m.max_before_label};
}

// Where a kernel writes the per-token outputs of token_stats: (N, T) each, indexed by
// row = n * T + t; float32, and bool for label_is_argmax. The three metrics pointers are
// null unless the policy metrics were asked for.
struct TokenStatsOut {
  float* logp_pol;
  float* logp_ref;
  float* token_kl;
  float* lse_pol;
  float* lse_ref;
  float* entropy = nullptr;
  float* logit_mean = nullptr;
  bool* label_is_argmax = nullptr;

  TDPO_HD bool has_metrics() const { return entropy != nullptr; }

  TDPO_HD void write(int64_t row, const TokenStats& s) const {
    logp_pol[row] = s.logp_pol;
    logp_ref[row] = s.logp_ref;
    token_kl[row] = s.token_kl;
    lse_pol[row] = s.lse_pol;
    lse_ref[row] = s.lse_ref;
  }
  TDPO_HD void write_metrics(int64_t row, const PolicyMetrics& m) const {
    entropy[row] = m.entropy;
    logit_mean[row] = m.logit_mean;
    label_is_argmax[row] = m.label_is_argmax;
  }
  // A masked token's outputs are all 0 (false).
  TDPO_HD void write_masked(int64_t row) const {
    write(row, {0.f, 0.f, 0.f, 0.f, 0.f});
    if (has_metrics()) write_metrics(row, {0.f, 0.f, false});
  }
};

// A token's progress through its vocabulary row when the row arrives in tiles of
// columns (token_stats_tile): the softmax state of the columns seen so far, and the two
// label logits once the tile holding the label has been seen (NaN until then, so that a
// label no tile held shows as NaN rather than as a plausible number). Stored as
// kTileStateFloats consecutive floats per token.
struct TokenTileState {
  SoftmaxPairState softmax;
  float pol_label_logit;
  float ref_label_logit;
};

constexpr int kTileStateFloats = 7;
static_assert(sizeof(TokenTileState) == kTileStateFloats * sizeof(float),
              "load_tile_state and store_tile_state move every field of TokenTileState");

TDPO_HD TokenTileState empty_tile_state() { return {empty_state(), NAN, NAN}; }

// What a masked token's state holds: zeros (it is never folded, and finishes as 0).
TDPO_HD TokenTileState masked_tile_state() { return {{0.f, 0.f, 0.f, 0.f, 0.f}, 0.f, 0.f}; }

TDPO_HD TokenTileState load_tile_state(const float* p) {
  return {{p[0], p[1], p[2], p[3], p[4]}, p[5], p[6]};
}

TDPO_HD void store_tile_state(float* p, const TokenTileState& s) {
  p[0] = s.softmax.max_pol;
  p[1] = s.softmax.sum_pol;
  p[2] = s.softmax.max_ref;
  p[3] = s.softmax.sum_ref;
  p[4] = s.softmax.ref_diff_sum;
  p[5] = s.pol_label_logit;
  p[6] = s.ref_label_logit;
}

// The state after folding in a tile of columns whose softmax state is `tile`: x and r
// point at the tile's policy and reference logits, label_col is the label's column
// counted from the tile's first one (outside [0, tile_len) when another tile holds it).
template <typename P, typename R>
TDPO_HD TokenTileState fold_tile(const TokenTileState& before, const SoftmaxPairState& tile,
                                 const P* x, const R* r, int64_t label_col, int64_t tile_len) {
  TokenTileState after{merge_states(before.softmax, tile), before.pol_label_logit,
                       before.ref_label_logit};
  if (label_col >= 0 && label_col < tile_len) {
    after.pol_label_logit = static_cast<float>(x[label_col]);
    after.ref_label_logit = static_cast<float>(r[label_col]);
  }
  return after;
}

TDPO_HD TokenStats finish_tile_state(const TokenTileState& s) {
  return finish_token_stats(s.softmax, s.pol_label_logit, s.ref_label_logit);
}

// With the policy metrics, a token's tile state is followed by its PolicyMetricsState:
// kTileStateWithMetricsFloats floats per token in all.
constexpr int kMetricsStateFloats = 4;
constexpr int kTileStateWithMetricsFloats = kTileStateFloats + kMetricsStateFloats;
static_assert(sizeof(PolicyMetricsState) == kMetricsStateFloats * sizeof(float),
              "load_metrics_state and store_metrics_state move every field");

// A masked token's metrics state: zeros, as masked_tile_state.
TDPO_HD PolicyMetricsState masked_metrics_state() { return {0.f, 0.f, 0.f, 0.f}; }

// p points at the token's kTileStateWithMetricsFloats floats.
TDPO_HD PolicyMetricsState load_metrics_state(const float* p) {
  p += kTileStateFloats;
  return {p[0], p[1], p[2], p[3]};
}

TDPO_HD void store_metrics_state(float* p, const PolicyMetricsState& m) {
  p += kTileStateFloats;
  p[0] = m.centered_sum;
  p[1] = m.logit_sum;
  p[2] = m.columns;
  p[3] = m.max_before_label;
}

// d loss / d policy logit v at one token, given the upstream gradients of that token's
// logp_pol (grad_logp) and token_kl (grad_kl):
//   grad_logp * (onehot(y) - p) + grad_kl * (p - q)
//   = coef_pol * p + coef_ref * q + [v == y] * grad_logp
struct TokenGradCoefs {
  float coef_pol;
  float coef_ref;
  float label_bonus;
};

TDPO_HD TokenGradCoefs token_grad_coefs(float grad_logp, float grad_kl) {
  return {grad_kl - grad_logp, -grad_kl, grad_logp};
}

TDPO_HD float token_grad_element(const TokenGradCoefs& c, float p_pol, float p_ref) {
  return c.coef_pol * p_pol + c.coef_ref * p_ref;
}

// ---------------------------------------------------------------------------------
// Pairwise preference loss.
enum class Variant : int32_t { TDPO1 = 0, TDPO2 = 1, DPO = 2 };
// Their names, indexed by Variant: the op's `variant` argument, and tdpo_ext.ops.VARIANTS
// (exported by csrc/python_module.cpp).
constexpr std::array<std::string_view, 3> kVariantNames = {"tdpo1", "tdpo2", "dpo"};

// -logsigmoid(z) = softplus(-z), written so that neither branch overflows.
TDPO_HD float neg_logsigmoid(float z) {
  return fmaxf(-z, 0.f) + log1pf(expf(-fabsf(z)));
}

TDPO_HD float sigmoid(float z) {
  const float e = expf(-fabsf(z));
  return z >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// The argument of the logsigmoid, before beta:
//   TDPO1: u - (kl_rejected - kl_chosen)
//   TDPO2: u - alpha * (kl_rejected - kl_chosen)   (kl_chosen gets no gradient)
//   DPO:   u
// with u = margin_chosen - margin_rejected.
TDPO_HD float preference_logit(float chosen_margin, float rejected_margin, float chosen_kl,
                               float rejected_kl, float alpha, Variant variant) {
  const float u = chosen_margin - rejected_margin;
  switch (variant) {
    case Variant::TDPO1: return u - (rejected_kl - chosen_kl);
    case Variant::TDPO2: return u - alpha * (rejected_kl - chosen_kl);
    default: return u;
  }
}

struct PairLoss {
  float loss;
  float chosen_reward;
  float rejected_reward;
};

TDPO_HD PairLoss pair_loss(float chosen_margin, float rejected_margin, float chosen_kl,
                           float rejected_kl, float beta, float alpha, Variant variant) {
  const float z = preference_logit(chosen_margin, rejected_margin, chosen_kl, rejected_kl,
                                   alpha, variant);
  // Rewards are beta * (margin + seq_kl) for every variant, as in the reference code.
  return {neg_logsigmoid(beta * z), beta * (chosen_margin + chosen_kl),
          beta * (rejected_margin + rejected_kl)};
}

struct PairLossGrad {
  float chosen_margin;
  float rejected_margin;
  float chosen_kl;
  float rejected_kl;
};

TDPO_HD PairLossGrad pair_loss_grad(float grad_loss, float chosen_margin, float rejected_margin,
                                    float chosen_kl, float rejected_kl, float beta, float alpha,
                                    Variant variant) {
  const float z = preference_logit(chosen_margin, rejected_margin, chosen_kl, rejected_kl,
                                   alpha, variant);
  // d/dz softplus(-beta z) = -beta * sigmoid(-beta z)
  const float dz = -grad_loss * beta * sigmoid(-beta * z);
  PairLossGrad g;
  g.chosen_margin = dz;
  g.rejected_margin = -dz;
  switch (variant) {
    case Variant::TDPO1: g.chosen_kl = dz; g.rejected_kl = -dz; break;
    case Variant::TDPO2: g.chosen_kl = 0.f; g.rejected_kl = -alpha * dz; break;
    default: g.chosen_kl = 0.f; g.rejected_kl = 0.f; break;
  }
  return g;
}

// The pairwise loss's inputs as one kernel argument: B pairs of contiguous float32 values
// and the hyperparameters, for the CPU loop and the CUDA kernels alike.
struct PairArgs {
  const float* chosen_margin;
  const float* rejected_margin;
  const float* chosen_kl;
  const float* rejected_kl;
  int64_t pairs;
  float beta;
  float alpha;
  Variant variant;
};

// Where the pairwise loss's kernels write: (B,) float32 each, indexed by pair.
struct PairLossOut {
  float* loss;
  float* chosen_reward;
  float* rejected_reward;

  TDPO_HD void write(int64_t i, const PairLoss& v) const {
    loss[i] = v.loss;
    chosen_reward[i] = v.chosen_reward;
    rejected_reward[i] = v.rejected_reward;
  }
};

struct PairLossGradOut {
  float* chosen_margin;
  float* rejected_margin;
  float* chosen_kl;
  float* rejected_kl;

  TDPO_HD void write(int64_t i, const PairLossGrad& g) const {
    chosen_margin[i] = g.chosen_margin;
    rejected_margin[i] = g.rejected_margin;
    chosen_kl[i] = g.chosen_kl;
    rejected_kl[i] = g.rejected_kl;
  }
};

TDPO_HD PairLoss pair_loss_at(const PairArgs& in, int64_t i) {
  return pair_loss(in.chosen_margin[i], in.rejected_margin[i], in.chosen_kl[i],
                   in.rejected_kl[i], in.beta, in.alpha, in.variant);
}

TDPO_HD PairLossGrad pair_loss_grad_at(const PairArgs& in, const float* grad_losses,
                                       int64_t i) {
  return pair_loss_grad(grad_losses[i], in.chosen_margin[i], in.rejected_margin[i],
                        in.chosen_kl[i], in.rejected_kl[i], in.beta, in.alpha, in.variant);
}

}  // namespace tdpo_ext
