"""tdpo_ext.tdpo_loss end to end (token stats, row reduction, pairwise loss) against the
float64 oracle: every TDPOOutput field and the policy gradient of the loss."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import (EPS32, GRAD_ATOL, GRAD_RTOL, RTOL, ULPS, policy_grad_scale,
                          tdpo_loss_coef_error, upstream_token_grads)
from inputs import DTYPES, Case, build
from strategies import cases

# Tolerances: RTOL, ULPS, GRAD_RTOL and GRAD_ATOL of error_bounds.py (float32 arithmetic
# for every input dtype), carried through the pairwise loss: a pair's loss moves by at
# most beta * (1 + alpha) times the rounding of its rows' statistics.
DETACHED_FIELDS = ("chosen_rewards", "rejected_rewards", "chosen_kl", "rejected_kl",
                   "chosen_logps", "rejected_logps")


def check_against_oracle(case: Case, device: str, *, beta: float, alpha: float, variant: str,
                         average_log_prob: bool) -> None:
    policy, ref, labels = build(case, device)
    ref.requires_grad_()
    kwargs = dict(beta=beta, alpha=alpha, variant=variant, ignore_index=case.ignore_index,
                  average_log_prob=average_log_prob)
    out = tdpo_ext.tdpo_loss(policy, ref, labels, **kwargs)
    policy64 = policy.detach().cpu().to(torch.float64).requires_grad_()
    expected = oracle.tdpo_loss(policy64, ref.cpu(), labels.cpu(), **kwargs)

    # Each row statistic is within row_bound; z sums a margin and alpha times a KL of
    # each row of the pair, a reward one margin and one KL.
    row_bound = ULPS * EPS32 * expected.stats.magnitude
    chosen_bound, rejected_bound = row_bound.chunk(2)
    losses_bound = beta * (1 + alpha) * (chosen_bound + rejected_bound)
    bounds = dict(loss=losses_bound.mean(), losses=losses_bound,
                  chosen_rewards=2 * beta * chosen_bound,
                  rejected_rewards=2 * beta * rejected_bound,
                  chosen_kl=chosen_bound, rejected_kl=rejected_bound,
                  chosen_logps=chosen_bound, rejected_logps=rejected_bound)
    for name, bound in bounds.items():
        got = getattr(out, name)
        assert got.dtype == torch.float32 and got.device == policy.device, name
        assert_within(got, getattr(expected, name), rtol=RTOL, atol=bound, name=name)
    for name in DETACHED_FIELDS:
        assert not getattr(out, name).requires_grad, f"{name} must be detached"

    grad_policy, grad_ref = torch.autograd.grad(out.loss, [policy, ref], allow_unused=True)
    assert grad_ref is None, "the reference model must get no gradient"
    assert grad_policy.dtype == case.policy_dtype and grad_policy.shape == policy.shape

    grad_logp, grad_kl = upstream_token_grads(expected.loss, expected.stats.tokens)
    grad64, = torch.autograd.grad(expected.loss, policy64)
    coef_error = tdpo_loss_coef_error((1 + alpha) * expected.stats.magnitude, beta)
    scale = policy_grad_scale(expected.stats.tokens, grad_logp, grad_kl, coef_error)
    assert_within(grad_policy, grad64, rtol=GRAD_RTOL[case.policy_dtype],
                  atol=ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype],
                  name="grad policy_logits")


@given(case=cases(even_rows=True), beta=st.sampled_from((0.01, 0.1, 1.0)),
       alpha=st.sampled_from((0.0, 0.5, 2.0)), variant=st.sampled_from(oracle.VARIANTS),
       average_log_prob=st.booleans())
def test_matches_oracle(device, case, beta, alpha, variant, average_log_prob):
    check_against_oracle(case, device, beta=beta, alpha=alpha, variant=variant,
                         average_log_prob=average_log_prob)


@pytest.mark.parametrize("variant", oracle.VARIANTS)
@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("policy_dtype", DTYPES)
def test_each_variant_dtype_and_reduction(device, variant, average_log_prob, policy_dtype):
    """Every combination at least once, with a fully masked row and a strided view."""
    case = Case(n=4, t=5, v=50, policy_dtype=policy_dtype, ref_dtype=torch.bfloat16,
                policy_layout="slice_t", scale=8.0, masked_rows=(2,), seed=1)
    check_against_oracle(case, device, beta=0.1, alpha=0.5, variant=variant,
                         average_log_prob=average_log_prob)


@pytest.mark.parametrize("policy_requires_grad", [True, False])
def test_reference_gets_no_gradient(device, policy_requires_grad):
    """A reference that requires grad (a frozen model someone forgot to detach) must not
    receive one, also when it is the only input that requires grad."""
    case = Case(n=2, t=4, v=10, policy_dtype=torch.float32, ref_dtype=torch.float32)
    policy, ref, labels = build(case, device, policy_requires_grad=policy_requires_grad)
    ref = ref.detach().requires_grad_()
    tdpo_ext.tdpo_loss(policy, ref, labels, variant="tdpo1").loss.backward()
    assert ref.grad is None
