"""How far float32 arithmetic may move each kernel output from the float64 oracle.

The kernels compute in float32 whatever the input dtype. A float32 result built from
terms t_i carries a rounding error of a few EPS32 * sum |t_i|, however small the result
is: KL = E_q[r - x] - lse_ref + lse_pol is ~0 for two close models while its terms
are the size of the logits. A tolerance relative to the result alone would be wrong
there, so each bound below is EPS32 times the magnitude of the summed terms, which
the oracle reports; the test files scale it by a stated number of ulps.
"""
from __future__ import annotations

import torch

from typing import NamedTuple

from oracle import TokenTerms

EPS32 = torch.finfo(torch.float32).eps  # 2**-23

# The tolerances every kernel test states, in one place:
#   |kernel - oracle| <= RTOL * |oracle| + ULPS * EPS32 * magnitude of the summed terms
# Measured on CPU over 400 random cases: errors up to 0.4 * EPS32 * magnitude; ULPS = 8
# leaves room for other summation orders and exponentials (the CUDA kernels).
RTOL = 1e-5
ULPS = 8
# token_kl is computed in each row's maxima's frame (csrc/tdpo_math.h), so its bound
# is KL_ULPS * EPS32 * kl_magnitude (oracle.kl_frame_magnitude): the size of the rows'
# spread and of the models' difference, not of the logits, so that it does not grow when
# a constant is added to the logits. Measured on CPU over 150 random cases at offsets
# 0 to 1e4, whole rows and tiles: errors up to 0.8 * EPS32 * kl_magnitude.
KL_ULPS = 8
# The absolute targets on the case of issue 23, float32 policy logits 3 N(0, 1) + offset
# and reference logits = policy + 0.01 N(0, 1), T = 512, V = 32000, offsets 0, 30 and 100
# (a true token KL of ~5e-5): per token, and summed over the 511 tokens of a sequence.
# The eager float32 formula sum(q * (log_softmax(r) - log_softmax(x))) is off by 1.9e-6
# per token there.
KL_TOKEN_ATOL = 1e-6
KL_SEQUENCE_ATOL = 2e-5
# The policy metrics (PolicyMetricsState in csrc/tdpo_math.h), bounded as token_kl is: a
# stated number of ulps times the magnitude of the terms each is computed from, which
# oracle.policy_metric_terms reports.
#
# entropy = log S - C / S with S = sum_v exp(d_v), C = sum_v exp(d_v) d_v, d_v = x_v - m in
# the frame of the row's maximum m (p = softmax(x)). The kernels take each chunk's or
# tile's sums in the frame of its own maximum s <= m, where |x_v - s| <= |d_v|, and rebase
# them onto m as exp(s - m) (C_s + (s - m) S_s): terms of the same sizes. In float32:
#   - x_v - s is rounded by at most EPS32/2 |d_v| (it is exact for the two inputs' exact
#     float32 values within a factor 2), which exp turns into a relative error of that size
#     in exp(d_v) and in exp(d_v) d_v; so are the rescale factors' exp(s - m), |s - m| <=
#     |d_v| for every column they scale. Relative to S, summed over the row: E_p[d^2];
#   - exp's own rounding (a few ulps) and the sums' (each addition EPS32/2 of its partial
#     sum; errors of either sign, growing like the square root of the additions' depth):
#     EPS32 relative to S, i.e. 1 in log S and E_p[|d|] in C / S;
#   - the division C / S, log S, and their difference: E_p[|d|] and |log S|.
# So |entropy - oracle| <= ENTROPY_ULPS * EPS32 * (1 + |log S| + E_p[|d|] + E_p[d^2]),
# where ENTROPY_ULPS counts the ulps of each step, as ULPS does. Only differences to a
# maximum are rounded: the bound does not grow with the logits' offset.
# Measured on CPU (AVX512, AVX2, DEFAULT kernels) over 1060 random cases (inputs.draw_case,
# offsets up to 1e4), whole rows and tiles merged in random order: errors up to 1.2 ulps
# of that magnitude.
ENTROPY_ULPS = 8
# logit_mean = (sum_v x_v) / V, the sum in float32: each addition rounds its partial sum
# by EPS32/2, at most EPS32/2 * sum_v |x_v|, and the division once more. Errors of either
# sign: the sum of k additions' errors grows like sqrt(k) (at most 256 sequential
# additions per SIMD lane in a 2048-column chunk, then the lanes' and chunks' merges), so
# |logit_mean - oracle| <= LOGIT_MEAN_ULPS * EPS32 * mean_v |x_v|. A -inf logit gives
# -inf, exactly. Measured as the entropy: errors up to 1.8 ulps of that magnitude.
LOGIT_MEAN_ULPS = 8
# Gradients come back in the policy dtype, rounded once from float32: up to half an ulp
# of that dtype (relative) on top of the float32 bound. Absolute floors: float16's
# subnormal spacing, and for float32 / bfloat16 values below float32's smallest normal,
# which the exponentials may flush to 0.
GRAD_RTOL = {torch.float32: RTOL, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
GRAD_ATOL = {torch.float32: 16 * torch.finfo(torch.float32).tiny,
             torch.bfloat16: 16 * torch.finfo(torch.float32).tiny,
             torch.float16: 2.0**-24}


def upstream_token_grads(loss: torch.Tensor, tokens: TokenTerms):
    """d loss / d (logp_pol, token_kl) per token, float64 (N, T-1): the coefficients the
    kernel's backward receives. A statistic the loss ignores gets 0."""
    return torch.autograd.grad(loss, [tokens.logp_pol, tokens.token_kl], retain_graph=True,
                               allow_unused=True, materialize_grads=True)


def policy_grad_scale(tokens: TokenTerms, grad_logp: torch.Tensor, grad_kl: torch.Tensor,
                      coef_error: torch.Tensor | float) -> torch.Tensor:
    """(N, T, V) magnitude of the float32 rounding in d loss / d policy_logits, in units
    of EPS32.

    The element is grad_logp * (onehot(y) - p) + grad_kl * (p - q). Its float32 error:
      - p = exp(x - lse_pol): x - lse_pol is rounded on the scale of |lse_pol| + |log p|,
        and exp turns that absolute error into a relative one; likewise q;
      - the coefficients carry their own relative error, coef_error (per row, in units of
        EPS32): 1 for exact upstream weights, more when they come from a loss whose
        inputs were rounded (see tdpo_loss_coef_error).
    Position T-1 predicts nothing and masked tokens get no gradient: scale 0, so these
    must be exactly 0.
    """
    gl = grad_logp.abs().unsqueeze(-1)
    gk = grad_kl.abs().unsqueeze(-1)
    p, q = tokens.logp_x.exp(), tokens.logp_r.exp()
    onehot = torch.zeros_like(p).scatter_(-1, tokens.targets.unsqueeze(-1), 1.0)
    # p * (1 + |lse| + |log p|), written with xlogy so that p = 0 gives 0, not 0 * inf.
    p_err = p * (1 + tokens.lse_pol.abs().unsqueeze(-1)) - torch.xlogy(p, p)
    q_err = q * (1 + tokens.lse_ref.abs().unsqueeze(-1)) - torch.xlogy(q, q)
    terms = (gl + gk) * p + gk * q + gl * onehot
    coef_error = torch.as_tensor(coef_error, dtype=torch.float64)
    if coef_error.dim() == 1:
        coef_error = coef_error[:, None, None]
    scale = (gl + gk) * p_err + gk * q_err + gl * onehot + coef_error * terms
    return torch.nn.functional.pad(scale, (0, 0, 0, 1))  # position T-1: exactly 0


def tdpo_loss_coef_error(row_error: torch.Tensor, beta: float) -> torch.Tensor:
    """Relative error (units of EPS32) of each row's upstream gradient under tdpo_loss,
    given the error (units of EPS32) each row contributes to its pair's z: the upstream
    gradient -beta * sigmoid(-beta * z) / B moves by up to beta times the error of z,
    relative."""
    chosen, rejected = row_error.chunk(2)
    pair = (chosen + rejected).repeat(2)
    return 1 + beta * pair


# Preference pairs (float32 inputs and arithmetic). z = u - alpha * (kl_rej - kl_cho) is
# formed from four float32 values, so its rounding is EPS32 * Mz with
# Mz = |m_cho| + |m_rej| + max(1, alpha) * (|kl_cho| + |kl_rej|), however small z is.
#   loss:    RTOL relative + ULPS * EPS32 * beta * Mz   (d loss / dz is at most beta)
#   rewards: RTOL relative + ULPS * EPS32 * beta * (|margin| + |kl|)
#   grads:   |grad| <= beta * max(1, alpha) * |upstream|; sigmoid(-beta z) moves by at
#            most beta * (error of z) relative: ULPS * EPS32 * that * (1 + beta * Mz)
# Everywhere, an absolute PAIR_FLOOR: results below float32's smallest normal (from
# subnormal inputs) may flush to 0.
PAIR_FLOOR = torch.finfo(torch.float32).tiny


class PairAtols(NamedTuple):
    """Absolute parts of the bounds above (each beside RTOL relative), per pair."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    grads: torch.Tensor  # of each input, for upstream gradients `upstream` of the losses


def pair_atols(chosen_margin, rejected_margin, chosen_kl, rejected_kl, upstream: torch.Tensor,
               beta: float, alpha: float) -> PairAtols:
    mc, mr, kc, kr = (t.detach().double().abs() for t in (chosen_margin, rejected_margin,
                                                           chosen_kl, rejected_kl))
    mz = mc + mr + max(1.0, alpha) * (kc + kr)
    return PairAtols(
        losses=ULPS * EPS32 * beta * mz + PAIR_FLOOR,
        chosen_rewards=ULPS * EPS32 * beta * (mc + kc) + PAIR_FLOOR,
        rejected_rewards=ULPS * EPS32 * beta * (mr + kr) + PAIR_FLOOR,
        grads=(ULPS * EPS32 * beta * max(1.0, alpha) * upstream.double().abs()
               * (1 + beta * mz) + PAIR_FLOOR))
