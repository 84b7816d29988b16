"""The CUDA kernels against the CPU kernels on the same inputs. (Each is also checked
against the oracle through the device fixture; this compares them directly, lse
included, which the public functions do not expose.)"""
import pytest
import torch

import oracle
import tdpo_ext
from compare import assert_within
import error_bounds
from error_bounds import EPS32, policy_grad_scale
from inputs import Case, build

# Each device is within error_bounds' tolerances of the oracle (test_sequence_stats.py),
# so the two are within twice those of each other.
RTOL = 2 * error_bounds.RTOL
ULPS = 2 * error_bounds.ULPS
GRAD_RTOL = {dtype: 2 * rtol for dtype, rtol in error_bounds.GRAD_RTOL.items()}
GRAD_ATOL = {dtype: 2 * atol for dtype, atol in error_bounds.GRAD_ATOL.items()}

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and tdpo_ext.built_with_cuda()),
    reason="needs a GPU and the CUDA kernels")


CASES = [
    Case(n=4, t=6, v=1000, policy_dtype=torch.float32, ref_dtype=torch.float32, seed=1),
    Case(n=2, t=3, v=65536 + 13, policy_dtype=torch.bfloat16, ref_dtype=torch.float32,
         scale=60.0, seed=2),
    Case(n=4, t=5, v=17, policy_dtype=torch.float16, ref_dtype=torch.bfloat16,
         policy_layout="slice_t", ref_layout="vocab_strided", masked_rows=(2,), seed=3),
    Case(n=2, t=4, v=4100, policy_dtype=torch.float32, ref_dtype=torch.float16,
         offset=1e4, scale=30.0, ref_relation="close", seed=4),
    Case(n=2, t=1, v=3, policy_dtype=torch.float32, ref_dtype=torch.float32, seed=5),
]


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.n}x{c.t}x{c.v}-{c.policy_dtype}")
def test_token_stats_and_backward(case):
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    cpu = torch.ops.tdpo_ext.token_stats(policy, ref, targets, case.ignore_index)
    gpu = torch.ops.tdpo_ext.token_stats(policy.cuda(), ref.cuda(), targets.cuda(),
                                         case.ignore_index)
    tokens = oracle.token_terms(policy, ref, labels, case.ignore_index)
    magnitude = torch.nn.functional.pad(tokens.magnitude, (0, 1))  # position T-1: 0
    for name, c, g in zip(("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref"), cpu, gpu):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=name)

    grad_logp, grad_kl = torch.randn((2, *targets.shape),
                                     generator=torch.Generator().manual_seed(case.seed))
    grad_cpu = torch.ops.tdpo_ext.token_stats_backward(
        grad_logp, grad_kl, policy, ref, targets, cpu[3], cpu[4], case.ignore_index)
    grad_gpu = torch.ops.tdpo_ext.token_stats_backward(
        grad_logp.cuda(), grad_kl.cuda(), policy.cuda(), ref.cuda(), targets.cuda(),
        gpu[3], gpu[4], case.ignore_index)
    assert grad_gpu.dtype == grad_cpu.dtype == case.policy_dtype
    scale = policy_grad_scale(tokens, grad_logp[:, :-1].double(), grad_kl[:, :-1].double(),
                              coef_error=1.0)
    assert_within(grad_gpu, grad_cpu, rtol=GRAD_RTOL[case.policy_dtype],
                  atol=ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype],
                  name="grad policy_logits")


@needs_cuda
@pytest.mark.parametrize("variant", oracle.VARIANTS)
def test_preference_loss_and_backward(variant):
    gen = torch.Generator().manual_seed(0)
    pair = [torch.randn(64, generator=gen) * 10 for _ in range(4)]
    grad_losses = torch.randn(64, generator=gen)
    args = (0.1, 0.5, variant)
    magnitude = sum(t.abs() for t in pair)
    for name, c, g in zip(
            ("losses", "chosen_rewards", "rejected_rewards"),
            torch.ops.tdpo_ext.preference_loss(*pair, *args),
            torch.ops.tdpo_ext.preference_loss(*(t.cuda() for t in pair), *args)):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=name)
    for i, (c, g) in enumerate(zip(
            torch.ops.tdpo_ext.preference_loss_backward(grad_losses, *pair, *args),
            torch.ops.tdpo_ext.preference_loss_backward(grad_losses.cuda(),
                                                        *(t.cuda() for t in pair), *args))):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude * grad_losses.abs(),
                      name=f"grad {i}")
