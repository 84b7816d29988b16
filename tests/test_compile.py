"""tdpo_ext.tdpo_loss under torch.compile(fullgraph=True): no graph break, the same
values and gradients as eager, and one graph for every sequence length when T is
dynamic; with and without the policy metrics, also through the tiled ops."""
import functools

import pytest
import torch
import torch._dynamo.testing

import tdpo_ext
from inputs import Case, build


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_step(policy_logits, ref_logits, labels, policy_metrics=False):
    """What a training loop computes from the output: the loss, and logging statistics
    built from the detached fields (with policy_metrics, their means over the unmasked
    tokens, as TRL logs them)."""
    out = tdpo_ext.tdpo_loss(policy_logits, ref_logits, labels, beta=0.1, alpha=0.5,
                             variant="tdpo2", average_log_prob=False,
                             policy_metrics=policy_metrics)
    reward_accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
    kl_gap = (out.rejected_kl - out.chosen_kl).mean()
    logged = ()
    if policy_metrics:
        m = out.policy_metrics
        tokens = m.mask.sum()
        logged = tuple((t.float() * m.mask).sum() / tokens
                       for t in (m.entropy, m.logit_mean, m.label_is_argmax))
    return out.loss, reward_accuracy, kl_gap, out.chosen_logps - out.rejected_logps, *logged


def inputs_with_t(t, device):
    return build(Case(n=4, t=t, v=33, policy_dtype=torch.float32, ref_dtype=torch.bfloat16,
                      policy_layout="slice_t", masked_rows=(3,), seed=t), device)


def assert_matches_eager(step, policy, ref, labels, eager_step=train_step):
    compiled_out = step(policy, ref, labels)
    compiled_grad, = torch.autograd.grad(compiled_out[0], policy)
    eager_out = eager_step(policy, ref, labels)
    eager_grad, = torch.autograd.grad(eager_out[0], policy)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_fullgraph_matches_eager(device):
    step = torch.compile(train_step, fullgraph=True)
    assert_matches_eager(step, *inputs_with_t(6, device))


@pytest.mark.parametrize("policy_metrics", [False, True])
def test_dynamic_sequence_length_compiles_once(device, policy_metrics):
    # aot_eager traces exactly what inductor receives (dynamo graph, fake kernels with a
    # symbolic T, AOT autograd) without inductor's code generation, which the test above
    # covers and which takes half a minute on two cores.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eager_step = functools.partial(train_step, policy_metrics=policy_metrics)
    step = torch.compile(eager_step, fullgraph=True, backend=counter)
    for t in (5, 9):
        policy, ref, labels = inputs_with_t(t, device)
        for tensor in (policy, ref, labels):
            torch._dynamo.mark_dynamic(tensor, 1)
        assert_matches_eager(step, policy, ref, labels, eager_step)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs for two T"


@pytest.mark.parametrize("policy_metrics", [False, True])
def test_tiled_ops_fullgraph(device, policy_metrics):
    """token_stats_tile folded over two tiles, then token_stats_finish: one graph (the
    state's width follows the flag, the metrics' shapes the state's width), equal to
    eager."""
    policy, ref, labels = inputs_with_t(6, device)
    policy = policy.detach()
    targets = tdpo_ext.shift_labels(labels)
    ops = torch.ops.tdpo_ext

    def tiled(policy, ref, targets):
        state = ops.token_stats_tile(policy[..., :20], ref[..., :20], targets, -100, 0, None,
                                     policy_metrics)
        state = ops.token_stats_tile(policy[..., 20:], ref[..., 20:], targets, -100, 20, state,
                                     policy_metrics)
        return ops.token_stats_finish(state, targets, -100)

    compiled = torch.compile(tiled, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(policy, ref, targets), tiled(policy, ref, targets)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)
