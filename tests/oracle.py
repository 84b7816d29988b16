"""A float64 oracle of TDPO, written from the method's formulas, not from the kernels.

Inputs of any floating dtype are upcast to float64 as they are: bfloat16, float16 and
float32 values are exact in float64, so the oracle sees exactly the numbers the kernels
read. Probabilities come from log_softmax, never softmax().log() as in the reference
code, which underflows to log(0) = -inf and turns 0 * -inf into NaN once a row's logits
spread beyond ~104 in float32 (or ~745 in float64).

Besides the values, the oracle reports the magnitude of the terms each value is summed
from, so that tests can bound float32 rounding (tests/error_bounds.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

VARIANTS = ("tdpo1", "tdpo2", "dpo")


class TokenTerms(NamedTuple):
    """Float64 quantities of the positions 0..T-2, the ones that predict a label
    (position T-1 predicts nothing). (N, T-1) unless said otherwise."""
    logp_pol: torch.Tensor   # log pi_theta(y | prefix), 0 where masked; in the autograd graph
    logp_ref: torch.Tensor   # log pi_ref(y | prefix), 0 where masked
    token_kl: torch.Tensor   # KL(pi_ref || pi_theta), 0 where masked; in the autograd graph
    mask: torch.Tensor       # bool, True where the label is not ignore_index
    targets: torch.Tensor    # int64 labels, ignore_index replaced by 0
    logp_x: torch.Tensor     # (N, T-1, V) policy log-probabilities, detached
    logp_r: torch.Tensor     # (N, T-1, V) reference log-probabilities
    lse_pol: torch.Tensor    # logsumexp of each policy row
    lse_ref: torch.Tensor    # logsumexp of each reference row
    magnitude: torch.Tensor  # sum of |terms| the three values are computed from; 0 if masked
    kl_magnitude: torch.Tensor  # the same for token_kl in the maxima's frame; 0 if masked


def token_terms(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                ignore_index: int = -100) -> TokenTerms:
    """Per-token terms; logits at t predict labels at t + 1. The gradient flows into
    policy_logits (when it requires grad), never into ref_logits."""
    x = policy_logits.to(torch.float64)[:, :-1]
    r = ref_logits.detach().to(torch.float64)[:, :-1]
    targets = labels[:, 1:].long()
    mask = targets != ignore_index
    targets = targets.where(mask, 0)

    logp_x = x.log_softmax(-1)
    logp_r = r.log_softmax(-1)
    q = logp_r.exp()
    # q log(q / p) is 0 where q is 0, also where log q = -inf (a -inf reference logit).
    support = q > 0
    token_kl = (q * torch.where(support, logp_r - logp_x, 0.0)).sum(-1)
    logp_pol = logp_x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp_ref = logp_r.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        lse_pol = x.logsumexp(-1)
        lse_ref = r.logsumexp(-1)
        label_logits = (x.gather(-1, targets.unsqueeze(-1)).abs()
                        + r.gather(-1, targets.unsqueeze(-1)).abs()).squeeze(-1)
        # token_kl = E_q[r - x] - lse_ref + lse_pol: each part is rounded on its own scale.
        expected_gap = (q * torch.where(support, (r - x).abs(), 0.0)).sum(-1)
        magnitude = label_logits + lse_pol.abs() + lse_ref.abs() + expected_gap
        kl_magnitude = kl_frame_magnitude(x, r, logp_x.exp(), q)

    def masked(t):
        return torch.where(mask, t, 0.0)

    return TokenTerms(masked(logp_pol), masked(logp_ref), masked(token_kl), mask, targets,
                      logp_x.detach(), logp_r, lse_pol, lse_ref, masked(magnitude),
                      masked(kl_magnitude))


def kl_frame_magnitude(x, r, p, q):
    """Sum of |terms| of KL = E_q[(r - x) - (max_r - max_x)] + log(sum_x / sum_r) with
    each model's sums taken relative to its row maximum (sum_x = sum_v exp(x_v - max_x)):
    the exponentials' arguments x - max_x and r - max_r, the differences r - x and
    max_r - max_x, the two logs, and 1 for the relative rounding of the sums. Each is
    the size of a row's spread or of the models' difference: adding a constant to both
    models' logits leaves it unchanged."""
    max_x, max_r = x.amax(-1, keepdim=True), r.amax(-1, keepdim=True)
    log_sum_x = (x - max_x).logsumexp(-1)
    log_sum_r = (r - max_r).logsumexp(-1)

    def expect(weights, values):  # 0 * inf is 0 here: a zero probability adds nothing
        return (weights * torch.where(weights > 0, values.abs(), 0.0)).sum(-1)

    return (1 + log_sum_x.abs() + log_sum_r.abs() + expect(p, x - max_x) + expect(q, r - max_r)
            + expect(q, r - x) + (max_r - max_x).squeeze(-1).abs())


class PolicyMetricTerms(NamedTuple):
    """The policy metrics of positions 0..T-2 in float64 (N, T-1), 0 / False where masked,
    and the magnitudes of the terms the kernels compute them from
    (tests/error_bounds.py)."""
    entropy: torch.Tensor            # -sum_v p_v log p_v, with 0 log 0 = 0
    logit_mean: torch.Tensor         # mean of the row's logits (-inf if one is -inf)
    label_is_argmax: torch.Tensor    # bool: the label is torch.argmax of the row
    entropy_magnitude: torch.Tensor  # error_bounds.entropy_atol's magnitude; 0 if masked
    logit_magnitude: torch.Tensor    # mean of |x| over the finite logits; 0 if masked


def policy_metric_terms(policy_logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int = -100) -> PolicyMetricTerms:
    """TRL's definitions of entropy, logits/* and mean_token_accuracy, per token; logits
    at t predict labels at t + 1."""
    x = policy_logits.detach().to(torch.float64)[:, :-1]
    targets = labels[:, 1:].long()
    mask = targets != ignore_index
    targets = targets.where(mask, 0)
    logp = x.log_softmax(-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    # In the frame of the row maximum m, the kernels' entropy is log S - E_p[d] with
    # d = x - m and S = sum exp(d).
    d = x - x.amax(-1, keepdim=True)
    d = torch.where(p > 0, d, 0.0)
    log_s = (x - x.amax(-1, keepdim=True)).logsumexp(-1)
    entropy_magnitude = 1 + log_s.abs() + (p * d.abs()).sum(-1) + (p * d.square()).sum(-1)
    finite = torch.isfinite(x)
    logit_magnitude = torch.where(finite, x.abs(), 0.0).sum(-1) / x.shape[-1]
    is_argmax = x.argmax(-1) == targets

    def masked(t):
        return torch.where(mask, t, torch.zeros((), dtype=t.dtype))

    return PolicyMetricTerms(masked(entropy), masked(x.mean(-1)), masked(is_argmax),
                             masked(entropy_magnitude), masked(logit_magnitude))


class SequenceStats(NamedTuple):
    """Per-row float64 statistics, (N,)."""
    logps_margin: torch.Tensor  # sum of log pi_theta(y) - log pi_ref(y)
    seq_kl: torch.Tensor        # sum of token KL(pi_ref || pi_theta)
    policy_logps: torch.Tensor  # sum of log pi_theta(y)
    magnitude: torch.Tensor     # sum of the tokens' term magnitudes (same reduction)
    tokens: TokenTerms


def sequence_stats(policy_logits, ref_logits, labels, *, ignore_index=-100,
                   average_log_prob=False) -> SequenceStats:
    tokens = token_terms(policy_logits, ref_logits, labels, ignore_index)
    sums = ((tokens.logp_pol - tokens.logp_ref).sum(-1), tokens.token_kl.sum(-1),
            tokens.logp_pol.sum(-1), tokens.magnitude.sum(-1))
    if average_log_prob:
        count = tokens.mask.sum(-1)
        # A row with no unmasked token gives 0 (its sums are 0; divide by 1, not 0).
        sums = tuple(s / count.clamp(min=1) for s in sums)
    return SequenceStats(*sums, tokens)


class PairLoss(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_loss(chosen_margin, rejected_margin, chosen_kl, rejected_kl, *, beta, alpha,
              variant) -> PairLoss:
    """The pairwise loss per pair, with u = chosen_margin - rejected_margin."""
    mc, mr, kc, kr = (t.to(torch.float64) for t in (chosen_margin, rejected_margin,
                                                     chosen_kl, rejected_kl))
    u = mc - mr
    if variant == "tdpo1":
        z = u - (kr - kc)
    elif variant == "tdpo2":
        z = u - alpha * (kr - kc.detach())
    elif variant == "dpo":
        z = u
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return PairLoss(-F.logsigmoid(beta * z), (beta * (mc + kc)).detach(),
                    (beta * (mr + kr)).detach())


class TDPOResult(NamedTuple):
    """The fields of tdpo_ext.TDPOOutput, in float64, plus the row statistics."""
    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_kl: torch.Tensor
    rejected_kl: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    stats: SequenceStats


def tdpo_loss(policy_logits, ref_logits, labels, *, beta, alpha, variant, ignore_index=-100,
              average_log_prob=False) -> TDPOResult:
    """N = 2B rows: the B chosen responses, then the B rejected ones."""
    stats = sequence_stats(policy_logits, ref_logits, labels, ignore_index=ignore_index,
                           average_log_prob=average_log_prob)
    chosen_margin, rejected_margin = stats.logps_margin.chunk(2)
    chosen_kl, rejected_kl = stats.seq_kl.chunk(2)
    chosen_logps, rejected_logps = stats.policy_logps.detach().chunk(2)
    pair = pair_loss(chosen_margin, rejected_margin, chosen_kl, rejected_kl, beta=beta,
                     alpha=alpha, variant=variant)
    return TDPOResult(pair.losses.mean(), pair.losses, pair.chosen_rewards,
                      pair.rejected_rewards, chosen_kl.detach(), rejected_kl.detach(),
                      chosen_logps, rejected_logps, stats)
