"""The token-stats ops over rows that arrive in tiles of vocabulary columns (what the fused
LM head computes: token_stats_tile + token_stats_finish, and token_stats_backward with
vocab_start) against the whole-row ops on the same inputs, on each device: random tile
boundaries, dtypes, layouts, masks."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import EPS32, GRAD_ATOL, GRAD_RTOL, RTOL, ULPS, policy_grad_scale
from inputs import Case, build
from strategies import cases, tile_edges

ops = torch.ops.tdpo_ext
STAT_NAMES = ("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref")


def tiled_token_stats(policy, ref, targets, ignore_index, edges, *, order=None,
                      policy_metrics=False):
    """token_stats_finish of the tiles cut at edges folded by token_stats_tile, in the
    order of the tile indices `order` (left to right unless given)."""
    tiles = list(zip(edges, edges[1:]))
    state = None
    for v0, v1 in (tiles if order is None else [tiles[i] for i in order]):
        state = ops.token_stats_tile(policy[..., v0:v1], ref[..., v0:v1], targets,
                                     ignore_index, v0, state, policy_metrics)
    return ops.token_stats_finish(state, targets, ignore_index)


def tiled_backward(grad_logp, grad_kl, policy, ref, targets, lse_pol, lse_ref, ignore_index,
                   edges):
    return torch.cat([ops.token_stats_backward(grad_logp, grad_kl, policy[..., v0:v1],
                                               ref[..., v0:v1], targets, lse_pol, lse_ref,
                                               ignore_index, v0)
                      for v0, v1 in zip(edges, edges[1:])], dim=-1)


@given(case=cases(), data=st.data())
def test_tiles_match_whole_rows(device, case, data):
    policy, ref, labels = build(case, device, policy_requires_grad=False)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    edges = data.draw(tile_edges(case.v))

    whole = ops.token_stats(policy, ref, targets, case.ignore_index)
    tiled = tiled_token_stats(policy, ref, targets, case.ignore_index, edges)
    # Each is within ULPS * EPS32 * magnitude of the oracle (test_sequence_stats.py), the
    # tiles merging their softmax states in another order: twice that of each other.
    tokens = oracle.token_terms(policy.cpu(), ref.cpu(), labels.cpu(), case.ignore_index)
    magnitude = torch.nn.functional.pad(tokens.magnitude, (0, 1)).to(device)
    for name, w, t in zip(STAT_NAMES, whole, tiled):
        assert t.dtype == torch.float32 and t.shape == targets.shape, name
        assert_within(t, w, rtol=2 * RTOL, atol=2 * ULPS * EPS32 * magnitude, name=name)

    gen = torch.Generator().manual_seed(case.seed)
    grad_logp, grad_kl = torch.randn((2, *targets.shape), generator=gen).to(device)
    grad_kl[::2] = 0  # rows that never read their reference logits, as TDPO2's chosen
    lse_pol, lse_ref = whole[3], whole[4]
    grad_whole = ops.token_stats_backward(grad_logp, grad_kl, policy, ref, targets, lse_pol,
                                          lse_ref, case.ignore_index)
    grad_tiled = tiled_backward(grad_logp, grad_kl, policy, ref, targets, lse_pol, lse_ref,
                                case.ignore_index, edges)
    assert grad_tiled.dtype == grad_whole.dtype == case.policy_dtype
    # Element for element the same formula; only which elements take the vector path and
    # which the scalar tail (different exp approximations) moves with the tile edges.
    scale = policy_grad_scale(tokens, grad_logp[:, :-1].double().cpu(),
                              grad_kl[:, :-1].double().cpu(), coef_error=1.0).to(device)
    assert_within(grad_tiled, grad_whole, rtol=2 * GRAD_RTOL[case.policy_dtype],
                  atol=2 * ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype],
                  name="grad policy_logits")


@pytest.mark.parametrize("policy_metrics", [False, True])
def test_state_layout_and_masked_tokens(device, policy_metrics):
    case = Case(n=2, t=4, v=10, policy_dtype=torch.float32, ref_dtype=torch.float32,
                masked_rows=(1,), seed=3)
    policy, ref, labels = build(case, device, policy_requires_grad=False)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    state = ops.token_stats_tile(policy, ref, targets, case.ignore_index, 0, None,
                                 policy_metrics)
    floats = 11 if policy_metrics else 7  # 7 + PolicyMetricsState's 4
    assert state.shape == (2, 4, floats) and state.dtype == torch.float32
    masked = targets == case.ignore_index
    assert torch.all(state[masked] == 0)
    # A whole row in one tile: the label logits of every unmasked token are known.
    label = targets.clamp(min=0).unsqueeze(-1)
    assert torch.equal(state[..., 5][~masked], policy.gather(-1, label).squeeze(-1)[~masked])
    assert torch.equal(state[..., 6][~masked], ref.gather(-1, label).squeeze(-1)[~masked])
    outputs = ops.token_stats_finish(state, targets, case.ignore_index)
    for out in outputs if policy_metrics else outputs[:5]:
        assert out.shape == targets.shape and torch.all(out[masked] == 0)
    for out in [] if policy_metrics else outputs[5:]:
        assert out.shape == (0,)


def test_label_no_tile_held_gives_nan(device):
    """Tiles cannot check labels against the whole vocabulary; one that no tile held shows
    as NaN instead of as a plausible number."""
    policy = torch.randn(1, 2, 8, device=device)
    targets = torch.tensor([[3, 9]], device=device)
    state = ops.token_stats_tile(policy, policy, targets, -100, 0, None)
    logp_pol, logp_ref, token_kl, *_ = ops.token_stats_finish(state, targets, -100)
    assert torch.isfinite(logp_pol[0, 0]) and torch.isnan(logp_pol[0, 1])
    assert torch.isnan(logp_ref[0, 1])
    assert torch.isfinite(token_kl).all()  # the KL needs no label


@pytest.mark.parametrize("bad,message", [
    (lambda p, t: dict(state=torch.zeros(2, 3, 5, device=p.device)), "state must have shape"),
    (lambda p, t: dict(state=torch.zeros(2, 3, 7, dtype=torch.float64, device=p.device)),
     "state must be float32"),
    (lambda p, t: dict(vocab_start=-1), "vocab_start must be >= 0"),
    # A state folded without the policy metrics, continued with them, and the reverse.
    (lambda p, t: dict(state=torch.zeros(2, 3, 7, device=p.device), policy_metrics=True),
     "every tile of a row must be folded with the same policy_metrics"),
    (lambda p, t: dict(state=torch.zeros(2, 3, 11, device=p.device)),
     "every tile of a row must be folded with the same policy_metrics"),
])
def test_tile_errors(device, bad, message):
    policy = torch.randn(2, 3, 5, device=device)
    targets = torch.zeros(2, 3, dtype=torch.long, device=device)
    args = dict(vocab_start=0, state=None, policy_metrics=False) | bad(policy, targets)
    with pytest.raises(RuntimeError, match=message):
        ops.token_stats_tile(policy, policy, targets, -100, args["vocab_start"], args["state"],
                             args["policy_metrics"])


def test_finish_and_backward_errors(device):
    policy = torch.randn(2, 3, 5, device=device)
    targets = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="state must have shape"):
        ops.token_stats_finish(torch.zeros(2, 4, 7, device=device), targets, -100)
    zeros = torch.zeros(2, 3, device=device)
    with pytest.raises(RuntimeError, match="vocab_start must be >= 0"):
        ops.token_stats_backward(zeros, zeros, policy, policy, targets, zeros, zeros, -100, -2)
