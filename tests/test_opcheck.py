"""torch.library.opcheck on every tdpo_ext op: schema (mutation and aliasing), autograd
registration, fake kernels, and AOT dispatch with dynamic shapes, on each device."""
import pytest
import torch

from inputs import Case, build

IGNORE_INDEX = -100


def token_stats_args(device, policy_dtype, ref_dtype, policy_layout):
    case = Case(n=2, t=5, v=37, policy_dtype=policy_dtype, ref_dtype=ref_dtype,
                policy_layout=policy_layout, masked_rows=(1,), seed=4)
    policy, ref, labels = build(case, device)
    # Already shifted: targets[n, t] is the label that logits[n, t] predicts.
    return policy, ref, labels, IGNORE_INDEX


@pytest.mark.parametrize("policy_dtype,ref_dtype,policy_layout,policy_metrics", [
    (torch.float32, torch.float32, "contiguous", False),
    (torch.float32, torch.float32, "contiguous", True),
    (torch.bfloat16, torch.float16, "slice_t", False),
    (torch.float16, torch.float32, "vocab_strided", True),
])
def test_token_stats(device, policy_dtype, ref_dtype, policy_layout, policy_metrics):
    args = token_stats_args(device, policy_dtype, ref_dtype, policy_layout)
    torch.library.opcheck(torch.ops.tdpo_ext.token_stats.default, (*args, policy_metrics))


@pytest.mark.parametrize("columns", [None, (10, 30)], ids=["whole_rows", "tile"])
def test_token_stats_backward(device, columns):
    policy, ref, targets, ignore_index = token_stats_args(device, torch.bfloat16,
                                                          torch.float32, "slice_t")
    policy = policy.detach()
    lse_pol, lse_ref = torch.ops.tdpo_ext.token_stats(policy, ref, targets, ignore_index)[3:5]
    grad_logp, grad_kl = torch.randn(2, *targets.shape, device=device)
    args = (grad_logp, grad_kl, policy, ref, targets, lse_pol, lse_ref, ignore_index)
    if columns is not None:  # the tile [v0, v1) of every row, as the fused LM head passes
        v0, v1 = columns
        args = (grad_logp, grad_kl, policy[..., v0:v1], ref[..., v0:v1], targets, lse_pol,
                lse_ref, ignore_index, v0)
    torch.library.opcheck(torch.ops.tdpo_ext.token_stats_backward.default, args)


@pytest.mark.parametrize("policy_metrics", [False, True])
def test_token_stats_tile_and_finish(device, policy_metrics):
    policy, ref, targets, ignore_index = token_stats_args(device, torch.float16,
                                                          torch.float32, "slice_t")
    policy = policy.detach()
    # Labels inside the first tile: a label not yet seen is NaN in the state, which
    # opcheck's comparison of eager and traced outputs would count as a mismatch.
    targets = torch.where(targets == ignore_index, targets, targets % 20)
    first = (policy[..., :20], ref[..., :20], targets, ignore_index, 0, None, policy_metrics)
    torch.library.opcheck(torch.ops.tdpo_ext.token_stats_tile.default, first)
    state = torch.ops.tdpo_ext.token_stats_tile(*first)
    second = (policy[..., 20:], ref[..., 20:], targets, ignore_index, 20, state, policy_metrics)
    torch.library.opcheck(torch.ops.tdpo_ext.token_stats_tile.default, second)
    state = torch.ops.tdpo_ext.token_stats_tile(*second)
    torch.library.opcheck(torch.ops.tdpo_ext.token_stats_finish.default,
                          (state, targets, ignore_index))


def pair_args(device, requires_grad):
    return [torch.randn(3, device=device, requires_grad=requires_grad) for _ in range(4)]


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2", "dpo"])
def test_preference_loss(device, variant):
    torch.library.opcheck(torch.ops.tdpo_ext.preference_loss.default,
                          (*pair_args(device, True), 0.1, 0.5, variant))


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2", "dpo"])
def test_preference_loss_backward(device, variant):
    grad_losses = torch.randn(3, device=device)
    torch.library.opcheck(torch.ops.tdpo_ext.preference_loss_backward.default,
                          (grad_losses, *pair_args(device, False), 0.1, 0.5, variant))
