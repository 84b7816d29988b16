"""tdpo_ext.preference_loss (the preference_loss op and its backward) against the
float64 oracle, for the three variants."""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import RTOL, pair_atols
from inputs import PAIR_ALPHAS, PAIR_BETAS
from strategies import pair_inputs

# Tolerances: RTOL and error_bounds.pair_atols (where they are derived).
INPUT_NAMES = ("chosen_logps_margin", "rejected_logps_margin", "chosen_kl", "rejected_kl")


def check_against_oracle(values, beta, alpha, variant, device):
    inputs = [torch.tensor(v, dtype=torch.float32, device=device, requires_grad=True)
              for v in values]
    losses, chosen_rewards, rejected_rewards = tdpo_ext.preference_loss(
        *inputs, beta=beta, alpha=alpha, variant=variant)
    inputs64 = [t.detach().cpu().double().requires_grad_() for t in inputs]
    expected = oracle.pair_loss(*inputs64, beta=beta, alpha=alpha, variant=variant)

    upstream = torch.randn(len(values[0]), generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    atols = pair_atols(*inputs64, upstream, beta, alpha)
    for name, got in zip(("losses", "chosen_rewards", "rejected_rewards"),
                         (losses, chosen_rewards, rejected_rewards)):
        assert_within(got, getattr(expected, name), rtol=RTOL, atol=getattr(atols, name),
                      name=name)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad

    grads = torch.autograd.grad((upstream.float().to(device) * losses).sum(), inputs,
                                allow_unused=True, materialize_grads=True)
    grads64 = torch.autograd.grad((upstream * expected.losses).sum(), inputs64,
                                  allow_unused=True, materialize_grads=True)
    for name, got, want in zip(INPUT_NAMES, grads, grads64):
        assert got.dtype == torch.float32
        # A statistic the variant ignores (or stops the gradient of) gets exactly 0.
        atol = atols.grads if bool(want.any()) else 0.0
        assert_within(got, want, rtol=RTOL, atol=atol, name=f"grad {name}")


@given(values=pair_inputs(), beta=st.sampled_from(PAIR_BETAS),
       alpha=st.sampled_from(PAIR_ALPHAS),
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
