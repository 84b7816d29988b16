"""The token KL's float32 error does not grow with the logits' offset: token_stats, its
tiled form (token_stats_tile + token_stats_finish) and the fused LM head against the
float64 oracle, at offsets up to 1e4, on each device; identical models give exactly 0,
and no token KL is negative."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import EPS32, KL_SEQUENCE_ATOL, KL_TOKEN_ATOL, KL_ULPS
from inputs import build
from strategies import cases, tile_edges
from test_token_stats_tile import tiled_token_stats

ops = torch.ops.tdpo_ext
KL_OFFSETS = (0.0, 30.0, 100.0, -100.0, 1e4)


def token_kls(policy, ref, targets, ignore_index, edges):
    """token_kl from the whole-row op and from the tiles cut at edges."""
    whole = ops.token_stats(policy, ref, targets, ignore_index)[2]
    tiled = tiled_token_stats(policy, ref, targets, ignore_index, edges)[2]
    return whole, tiled


@given(case=cases(), offset=st.sampled_from(KL_OFFSETS), data=st.data())
def test_kl_error_independent_of_offset(device, case, offset, data):
    case = dataclasses.replace(case, offset=offset)
    policy, ref, labels = build(case, device, policy_requires_grad=False)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    tokens = oracle.token_terms(policy.cpu(), ref.cpu(), labels.cpu(), case.ignore_index)
    want = torch.nn.functional.pad(tokens.token_kl, (0, 1))
    bound = KL_ULPS * EPS32 * torch.nn.functional.pad(tokens.kl_magnitude, (0, 1))
    for name, kl in zip(("whole rows", "tiles"),
                        token_kls(policy, ref, targets, case.ignore_index,
                                  data.draw(tile_edges(case.v)))):
        assert_within(kl, want, atol=bound, rtol=0.0, name=f"token_kl, {name}")
        assert bool((kl >= 0).all()), f"token_kl, {name}: negative"


def issue_case(offset: float, device: str):
    """Float32 policy logits 3 N(0, 1) + offset, reference = policy + 0.01 N(0, 1), one
    sequence of T = 512 tokens over V = 32000 (error_bounds.KL_TOKEN_ATOL)."""
    gen = torch.Generator().manual_seed(23)
    policy = 3 * torch.randn(1, 512, 32000, generator=gen) + offset
    ref = policy + 0.01 * torch.randn(policy.shape, generator=gen)
    labels = torch.randint(0, 32000, (1, 512), generator=gen)
    return policy.to(device), ref.to(device), labels.to(device)


def float64_kl(policy, ref):
    """Per-token KL(ref || policy) of positions 0..T-2, float64."""
    log_q = ref[:, :-1].double().log_softmax(-1)
    return (log_q.exp() * (log_q - policy[:, :-1].double().log_softmax(-1))).sum(-1)


@pytest.mark.parametrize("offset", [0.0, 30.0, 100.0])
def test_kl_absolute_error_on_issue_case(device, offset):
    policy, ref, labels = issue_case(offset, device)
    want = float64_kl(policy.cpu(), ref.cpu())
    kl = ops.token_stats(policy, ref, tdpo_ext.shift_labels(labels), -100)[2][:, :-1].cpu()
    token_error = float((kl.double() - want).abs().max())
    log_q = ref[:, :-1].log_softmax(-1)
    eager = (log_q.exp() * (log_q - policy[:, :-1].log_softmax(-1))).sum(-1).cpu()
    assert token_error <= KL_TOKEN_ATOL, f"per-token error {token_error:.3g}"
    assert token_error < float((eager.double() - want).abs().max()), "not better than eager"
    seq_kl = tdpo_ext.sequence_stats(policy, ref, labels)[1].cpu()
    seq_error = float((seq_kl.double() - want.sum(-1)).abs().max())
    assert seq_error <= KL_SEQUENCE_ATOL, f"sequence error {seq_error:.3g}"


@pytest.mark.parametrize("offset", [0.0, 30.0, 100.0])
def test_fused_head_kl_error_on_issue_case(device, offset):
    """The offset as the LM head's bias: logits h @ W.T + offset, the reference weight
    W + 0.01 N(0, 1) / sqrt(H), so that the logits are as in issue_case."""
    gen = torch.Generator().manual_seed(23)
    h_dim, vocab = 64, 32000
    hidden = torch.randn(1, 512, h_dim, generator=gen)
    weight = 3 * torch.randn(vocab, h_dim, generator=gen) / h_dim ** 0.5
    ref_weight = weight + 0.01 * torch.randn(vocab, h_dim, generator=gen) / h_dim ** 0.5
    bias = torch.full((vocab,), offset)
    labels = torch.randint(0, vocab, (1, 512), generator=gen)
    want = float64_kl(hidden.double() @ weight.double().T + offset,
                      hidden.double() @ ref_weight.double().T + offset).sum(-1)
    seq_kl = tdpo_ext.fused_linear_sequence_stats(
        *(t.to(device) for t in (hidden, weight, hidden, ref_weight, labels)),
        policy_bias=bias.to(device), ref_bias=bias.to(device))[1].cpu()
    seq_error = float((seq_kl.double() - want).abs().max())
    assert seq_error <= KL_SEQUENCE_ATOL, f"sequence error {seq_error:.3g}"


@pytest.mark.parametrize("offset", [0.0, 30.0, -1e4])
def test_identical_models_give_exactly_zero(device, offset):
    """Equal logits (V = 5000: several CPU chunks; tiles of unequal widths) give a
    token KL of exactly 0, and close ones (1e-6 apart: a KL far below float32's
    resolution of the terms) never a negative one."""
    gen = torch.Generator().manual_seed(3)
    policy = (offset + 4 * torch.randn(2, 6, 5000, generator=gen)).to(device)
    targets = torch.randint(0, 5000, (2, 6), generator=gen).to(device)
    edges = [0, 1, 2100, 4097, 5000]
    for kl in token_kls(policy, policy.clone(), targets, -100, edges):
        assert bool((kl == 0).all()), kl
    close = policy + 1e-6 * torch.randn(policy.shape, generator=gen).to(device)
    for kl in token_kls(policy, close, targets, -100, edges):
        assert bool((kl >= 0).all()), kl.min()


def test_minus_inf_columns(device):
    """-inf logits (masked vocabulary entries) at offset 100: in both models at every 7th
    column and over the first 2100 columns (an all -inf CPU chunk and an all -inf tile),
    the KL is finite and as precise as elsewhere; a -inf policy logit where the
    reference has mass gives an infinite KL."""
    gen = torch.Generator().manual_seed(5)
    vocab = 5000
    policy = 100 + 3 * torch.randn(2, 4, vocab, generator=gen)
    ref = policy + 0.01 * torch.randn(policy.shape, generator=gen)
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[:2100] = True
    banned[::7] = True
    policy, ref = policy.masked_fill(banned, float("-inf")), ref.masked_fill(banned, float("-inf"))
    labels = torch.randint(2100, vocab, (2, 4), generator=gen)
    labels[1, 2] = -100  # a masked position
    tokens = oracle.token_terms(policy, ref, labels)
    want = torch.nn.functional.pad(tokens.token_kl, (0, 1))
    bound = KL_ULPS * EPS32 * torch.nn.functional.pad(tokens.kl_magnitude, (0, 1))
    targets = tdpo_ext.shift_labels(labels).to(device)
    edges = [0, 2100, 3000, vocab]
    for kl in token_kls(policy.to(device), ref.to(device), targets, -100, edges):
        assert bool(torch.isfinite(kl).all())
        assert_within(kl, want, atol=bound, rtol=0.0, name="token_kl")

    policy[0, 1, 2200] = float("-inf")  # the reference keeps its mass there
    for kl in token_kls(policy.to(device), ref.to(device), targets, -100, edges):
        assert float(kl[0, 1]) == float("inf")
        assert bool(torch.isfinite(kl[1]).all())
