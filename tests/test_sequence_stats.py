"""tdpo_ext.sequence_stats (the token_stats op and its backward) against the float64
oracle: values and gradients, over shapes, masks, dtypes, memory layouts and extreme
logits."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import (EPS32, GRAD_ATOL, GRAD_RTOL, RTOL, ULPS, policy_grad_scale,
                          upstream_token_grads)
from inputs import DTYPES, Case, build
from strategies import cases
from tdpo_ext.reference import reference_sequence_stats

# Tolerances: RTOL, ULPS, GRAD_RTOL and GRAD_ATOL of error_bounds.py. The kernels compute
# in float32 whatever the input dtype, and the oracle reads the same (rounded) input
# values, so every dtype gets the float32 bounds (float32: relative 1e-5 plus 8 ulps of
# the summed terms' magnitude); gradients add the policy dtype's rounding.
STAT_NAMES = ("logps_margin", "seq_kl", "policy_logps")


def check_against_oracle(case: Case, device: str, average_log_prob: bool,
                         loss_terms: tuple[str, ...] = STAT_NAMES) -> None:
    """Values of the three statistics, and the gradient of a random weighting of those
    in loss_terms, from the kernels and from the oracle, agree within the bounds above."""
    policy, ref, labels = build(case, device)
    ref.requires_grad_()
    stats = tdpo_ext.sequence_stats(policy, ref, labels, ignore_index=case.ignore_index,
                                    average_log_prob=average_log_prob)
    policy64 = policy.detach().cpu().to(torch.float64).requires_grad_()
    expected = oracle.sequence_stats(policy64, ref.cpu(), labels.cpu(),
                                     ignore_index=case.ignore_index,
                                     average_log_prob=average_log_prob)

    bound = ULPS * EPS32 * expected.magnitude
    for name, got, want in zip(STAT_NAMES, stats, expected):
        assert got.dtype == torch.float32 and got.device == policy.device, name
        assert_within(got, want, atol=bound, rtol=RTOL, name=name)

    weights = torch.randn(3, case.n, generator=torch.Generator().manual_seed(case.seed))
    used = [STAT_NAMES.index(name) for name in loss_terms]
    loss = sum((weights[i].to(device) * stats[i]).sum() for i in used)
    grad_policy, grad_ref = torch.autograd.grad(loss, [policy, ref], allow_unused=True)
    assert grad_ref is None, "the reference model must get no gradient"
    assert grad_policy.dtype == case.policy_dtype
    assert grad_policy.shape == policy.shape

    loss64 = sum((weights[i].double() * expected[i]).sum() for i in used)
    grad_logp, grad_kl = upstream_token_grads(loss64, expected.tokens)
    grad64, = torch.autograd.grad(loss64, policy64)
    scale = policy_grad_scale(expected.tokens, grad_logp, grad_kl, coef_error=1.0)
    assert_within(grad_policy, grad64, rtol=GRAD_RTOL[case.policy_dtype],
                  atol=ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype],
                  name="grad policy_logits")


@given(case=cases(), average_log_prob=st.booleans())
def test_matches_oracle(device, case, average_log_prob):
    check_against_oracle(case, device, average_log_prob)


# The cases below are drawn by the property test only by chance; here they are certain.

@pytest.mark.parametrize("loss_terms", [("seq_kl",), ("policy_logps",), ("logps_margin",)])
def test_loss_of_one_statistic(device, loss_terms):
    """A loss that ignores the KL (or the log-probabilities) sends the backward no
    gradient at all for that per-token output, not zeros."""
    check_against_oracle(Case(n=2, t=5, v=40, policy_dtype=torch.float32,
                              ref_dtype=torch.float32, seed=7), device,
                         average_log_prob=False, loss_terms=loss_terms)

@pytest.mark.parametrize("dtype", DTYPES)
def test_large_vocabulary(device, dtype):
    """V >= 65536, not a multiple of the SIMD width or of the kernels' vocabulary chunk."""
    check_against_oracle(Case(n=2, t=3, v=65536 + 13, policy_dtype=dtype,
                              ref_dtype=torch.float32, mask_rate=0.0, seed=1), device,
                         average_log_prob=False)


@pytest.mark.parametrize("v", [1, 7, 17])
def test_single_position_predicts_nothing(device, v):
    case = Case(n=3, t=1, v=v, policy_dtype=torch.float32, ref_dtype=torch.float32,
                mask_rate=0.0)
    check_against_oracle(case, device, average_log_prob=True)
    policy, ref, labels = build(case, device)
    stats = tdpo_ext.sequence_stats(policy, ref, labels)
    assert all(bool((s == 0).all()) for s in stats)


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_fully_masked_rows_give_zero(device, average_log_prob):
    case = Case(n=4, t=5, v=33, policy_dtype=torch.float32, ref_dtype=torch.float32,
                mask_rate=0.0, masked_rows=(1, 3))
    check_against_oracle(case, device, average_log_prob)
    policy, ref, labels = build(case, device)
    stats = tdpo_ext.sequence_stats(policy, ref, labels, average_log_prob=average_log_prob)
    for s in stats:
        assert bool((s[[1, 3]] == 0).all()) and bool((s[[0, 2]] != 0).all())


@pytest.mark.parametrize("policy_layout", ["vocab_strided", "step_t", "expanded"])
@pytest.mark.parametrize("ref_layout", ["vocab_strided", "slice_t", "slice_v"])
def test_strided_views(device, policy_layout, ref_layout):
    check_against_oracle(Case(n=2, t=4, v=37, policy_dtype=torch.float32,
                              ref_dtype=torch.bfloat16, policy_layout=policy_layout,
                              ref_layout=ref_layout, seed=5), device, average_log_prob=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spread_beyond_float32_softmax(device, dtype):
    """Logits spread over 120: the reference pattern's float32 softmax().log() gives
    0 * log(0) = NaN in the KL; the kernels must stay finite and exact."""
    case = Case(n=2, t=4, v=50, policy_dtype=dtype, ref_dtype=dtype, scale=60.0,
                mask_rate=0.0, seed=3)
    policy, ref, labels = build(case, device)
    assert float(ref.max() - ref.min()) > 110
    assert torch.isnan(reference_sequence_stats(policy, ref, labels)[1]).any(), \
        "the case no longer reproduces the reference pattern's NaN"
    check_against_oracle(case, device, average_log_prob=False)


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("ref_relation", ["independent", "close"])
def test_large_magnitudes(device, offset, ref_relation):
    check_against_oracle(Case(n=2, t=4, v=100, policy_dtype=torch.float32,
                              ref_dtype=torch.float32, scale=30.0, offset=offset,
                              ref_relation=ref_relation, mask_rate=0.0, seed=11),
                         device, average_log_prob=False)


def test_near_one_hot_rows(device):
    check_against_oracle(Case(n=2, t=4, v=64, policy_dtype=torch.float32,
                              ref_dtype=torch.float32, scale=1e4, mask_rate=0.0, seed=2),
                         device, average_log_prob=False)


def test_identical_models_have_zero_kl(device):
    case = Case(n=2, t=6, v=300, policy_dtype=torch.float32, ref_dtype=torch.float32,
                ref_relation="same", offset=-30.0, mask_rate=0.0)
    policy, ref, labels = build(case, device)
    margin, seq_kl, _ = tdpo_ext.sequence_stats(policy, ref, labels)
    assert bool((margin == 0).all()) and bool((seq_kl == 0).all())


def test_minus_inf_logits(device):
    """-inf at the same places in both models (e.g. banned tokens): probability 0 in
    both, a finite KL, and no gradient there."""
    case = Case(n=2, t=4, v=20, policy_dtype=torch.float32, ref_dtype=torch.float32,
                mask_rate=0.0, seed=9)
    policy, ref, labels = build(case, device, policy_requires_grad=False)
    banned = torch.zeros(20, dtype=torch.bool)
    banned[::3] = True
    labels = labels.masked_fill(banned.to(device)[labels], 1)
    policy = policy.masked_fill(banned.to(device), float("-inf")).requires_grad_()
    ref = ref.masked_fill(banned.to(device), float("-inf"))

    stats = tdpo_ext.sequence_stats(policy, ref, labels)
    expected = oracle.sequence_stats(policy.detach().cpu(), ref.cpu(), labels.cpu())
    for name, got, want in zip(STAT_NAMES, stats, expected):
        assert_within(got, want, atol=ULPS * EPS32 * expected.magnitude, rtol=RTOL, name=name)
    grad, = torch.autograd.grad(sum(s.sum() for s in stats), policy)
    assert bool(torch.isfinite(grad).all()) and bool((grad[..., banned.to(device)] == 0).all())


def test_first_bad_label_is_named(device):
    """Several bad labels: the op names the first (smallest row, then smallest position)
    on every device, with the rows split between two threads, the later bad row's thread
    reaching its bad label first (at its first token, where row 0's is 8000 rows in)."""
    policy = torch.zeros(2, 8192, 512, device=device)
    labels = torch.zeros(2, 8192, dtype=torch.int64, device=device)
    labels[0, 8001], labels[0, 8100], labels[1, 1], labels[1, 5] = 600, -7, 512, 700
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(5):
            with pytest.raises(RuntimeError, match=r"labels holds 600 at row 0 \(predicted "
                                                   r"by logits position 8000\)"):
                tdpo_ext.sequence_stats(policy, policy, labels)
    finally:
        torch.set_num_threads(threads)
