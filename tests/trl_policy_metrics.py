"""DPOTrainer's metrics of the policy's completion tokens, which TDPOTrainer logs under the
same names, and how far two float32 computations of them may be apart: for the TRL tests
that compare TDPOTrainer's with DPOTrainer's, and several processes' with one's."""
from __future__ import annotations

import math

import pytest

from error_bounds import EPS32, ULPS

POLICY_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def policy_metrics_atol(policy) -> float:
    """How far two float32 computations of entropy or logits/* by the same policy on the
    same batch may be apart (TRL's and ours; one process's and two's).

    Each is a mean over completion tokens of a float32 value computed from the token's
    logits x_v = h . w_v, v < V; tests/error_bounds.py bounds a float32 value built from
    terms by ULPS * EPS32 * their total magnitude. With S = sqrt(H) max|g| max_v ||w_v||,
    which bounds every sum_k |h_k w_vk| and so every |x_v| (h is RMSNorm's output, of
    2-norm at most sqrt(H) max|g|, g its gain):
      - each logit is a dot product of terms totalling at most S; the entropy moves by at
        most 2S times a change of every logit (dH/dx_v = -p_v (x_v - E_p x)), the mean
        logit by 1 times: magnitude (2S + 1) S;
      - entropy = lse - sum_v p_v x_v, terms up to |lse| + max|x| <= ln V + 2S; the mean
        logit, terms up to S;
      - the sums over tokens and processes, and the quotient, of values up to ln V
        (entropy) or S.
    Each of the two computations: ULPS * EPS32 * (2 S^2 + S + ln V + 2S + ln V + S)
    (trl_setup's tied models: S = 1.38, V = 2048, so 4.7e-5 for both together)."""
    gain, weight = policy.model.norm.weight, policy.lm_head.weight
    vocab, hidden = weight.shape
    s = hidden ** 0.5 * gain.abs().max().item() * weight.norm(dim=1).max().item()
    return 2 * ULPS * EPS32 * (2 * s * s + 4 * s + 2 * math.log(vocab))


def assert_policy_metrics_close(got: dict, expected: dict, atol: float, what: str) -> None:
    """The four metrics of two logged steps: entropy and logits/* within atol, the token
    accuracy (a ratio of token counts) up to the float32 rounding of the quotient, which
    DPOTrainer divides in float32; an argmax that differed would move it by 1 / count."""
    for name in POLICY_METRICS:
        tol = EPS32 if name == "mean_token_accuracy" else atol
        assert got[name] == pytest.approx(expected[name], rel=0, abs=tol), (what, name)
