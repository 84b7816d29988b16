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
