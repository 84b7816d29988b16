"""tdpo_ext.preference_loss (the preference_loss op and its backward) against the
float64 oracle, for the three variants."""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import EPS32

# Tolerances (float32 inputs and arithmetic). z = u - alpha * (kl_rej - kl_cho) is formed
# from four float32 values, so its rounding is EPS32 * Mz with
# Mz = |m_cho| + |m_rej| + max(1, alpha) * (|kl_cho| + |kl_rej|), however small z is.
#   loss:    RTOL relative + ULPS * EPS32 * beta * Mz   (d loss / dz is at most beta)
#   rewards: RTOL relative + ULPS * EPS32 * beta * (|margin| + |kl|)
#   grads:   |grad| <= beta * max(1, alpha) * |upstream|; sigmoid(-beta z) moves by at
#            most beta * (error of z) relative: ULPS * EPS32 * that * (1 + beta * Mz)
# Everywhere, an absolute FLOOR: results below float32's smallest normal (from subnormal
# inputs) may flush to 0.
RTOL = 1e-5
ULPS = 8
FLOOR = torch.finfo(torch.float32).tiny
INPUT_NAMES = ("chosen_logps_margin", "rejected_logps_margin", "chosen_kl", "rejected_kl")

scales = st.sampled_from((2.0**-10, 1.0, 30.0, 1e4))  # exact in float32


@st.composite
def pair_inputs(draw):
    """Four float32 lists of one length: margins and KLs of B pairs."""
    b = draw(st.integers(1, 8))
    values = []
    for nonnegative in (False, False, True, True):
        bound = draw(scales)
        values.append(draw(st.lists(st.floats(0.0 if nonnegative else -bound, bound, width=32),
                                    min_size=b, max_size=b)))
    return values


def check_against_oracle(values, beta, alpha, variant, device):
    inputs = [torch.tensor(v, dtype=torch.float32, device=device, requires_grad=True)
              for v in values]
    losses, chosen_rewards, rejected_rewards = tdpo_ext.preference_loss(
        *inputs, beta=beta, alpha=alpha, variant=variant)
    inputs64 = [t.detach().cpu().double().requires_grad_() for t in inputs]
    expected = oracle.pair_loss(*inputs64, beta=beta, alpha=alpha, variant=variant)

    mc, mr, kc, kr = (t.detach().abs() for t in inputs64)
    mz = mc + mr + max(1.0, alpha) * (kc + kr)
    assert_within(losses, expected.losses, rtol=RTOL, atol=ULPS * EPS32 * beta * mz + FLOOR,
                  name="losses")
    assert_within(chosen_rewards, expected.chosen_rewards, rtol=RTOL,
                  atol=ULPS * EPS32 * beta * (mc + kc) + FLOOR, name="chosen_rewards")
    assert_within(rejected_rewards, expected.rejected_rewards, rtol=RTOL,
                  atol=ULPS * EPS32 * beta * (mr + kr) + FLOOR, name="rejected_rewards")
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad

    upstream = torch.randn(len(values[0]), generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    grads = torch.autograd.grad((upstream.float().to(device) * losses).sum(), inputs,
                                allow_unused=True, materialize_grads=True)
    grads64 = torch.autograd.grad((upstream * expected.losses).sum(), inputs64,
                                  allow_unused=True, materialize_grads=True)
    grad_atol = (ULPS * EPS32 * beta * max(1.0, alpha) * upstream.abs()
                 * (1 + beta * mz) + FLOOR)
    for name, got, want in zip(INPUT_NAMES, grads, grads64):
        assert got.dtype == torch.float32
        # A statistic the variant ignores (or stops the gradient of) gets exactly 0.
        atol = grad_atol if bool(want.any()) else 0.0
        assert_within(got, want, rtol=RTOL, atol=atol, name=f"grad {name}")


@given(values=pair_inputs(), beta=st.sampled_from((0.01, 0.1, 0.5, 2.0)),
       alpha=st.sampled_from((0.0, 0.5, 1.0, 3.0)),
       variant=st.sampled_from(oracle.VARIANTS))
@example(values=[[0.0], [0.0], [0.0], [2.0**-149]], beta=0.01, alpha=0.0,  # a subnormal
         variant="tdpo1")
def test_matches_oracle(device, values, beta, alpha, variant):
    check_against_oracle(values, beta, alpha, variant, device)


@pytest.mark.parametrize("variant", oracle.VARIANTS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_saturated_logits_stay_finite(device, variant, sign):
    """beta * z far beyond float32's exp range on either side: softplus must neither
    overflow nor lose the linear tail."""
    values = [[sign * 1e6, 0.0], [0.0, sign * 5e5], [0.0, 10.0], [3.0, 0.0]]
    check_against_oracle(values, 5.0, 0.5, variant, device)


def test_variants_differ_only_where_the_formulas_do(device):
    """tdpo1 and tdpo2 with alpha = 1 have the same loss, but tdpo2 stops the gradient of
    chosen_kl; dpo ignores both KLs."""
    values = [torch.tensor(v, device=device, requires_grad=True)
              for v in ([1.0, -2.0], [0.5, 0.0], [0.3, 0.1], [0.2, 0.9])]
    out = {v: tdpo_ext.preference_loss(*values, beta=0.1, alpha=1.0, variant=v)[0]
           for v in oracle.VARIANTS}
    torch.testing.assert_close(out["tdpo1"], out["tdpo2"])
    grad = {v: torch.autograd.grad(out[v].sum(), values) for v in oracle.VARIANTS}
    assert bool((grad["tdpo1"][2] != 0).all()) and bool((grad["tdpo2"][2] == 0).all())
    assert bool((grad["dpo"][2] == 0).all()) and bool((grad["dpo"][3] == 0).all())
