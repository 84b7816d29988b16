"""tdpo_ext.tdpo_loss under torch.compile(fullgraph=True): no graph break, the same
values and gradients as eager, and one graph for every sequence length when T is
dynamic."""
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


def train_step(policy_logits, ref_logits, labels):
    """What a training loop computes from the output: the loss, and logging statistics
    built from the detached fields."""
    out = tdpo_ext.tdpo_loss(policy_logits, ref_logits, labels, beta=0.1, alpha=0.5,
                             variant="tdpo2", average_log_prob=False)
    reward_accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
    kl_gap = (out.rejected_kl - out.chosen_kl).mean()
    return out.loss, reward_accuracy, kl_gap, out.chosen_logps - out.rejected_logps


def inputs_with_t(t, device):
    return build(Case(n=4, t=t, v=33, policy_dtype=torch.float32, ref_dtype=torch.bfloat16,
                      policy_layout="slice_t", masked_rows=(3,), seed=t), device)


def assert_matches_eager(step, policy, ref, labels):
    compiled_out = step(policy, ref, labels)
    compiled_grad, = torch.autograd.grad(compiled_out[0], policy)
    eager_out = train_step(policy, ref, labels)
    eager_grad, = torch.autograd.grad(eager_out[0], policy)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_fullgraph_matches_eager(device):
    step = torch.compile(train_step, fullgraph=True)
    assert_matches_eager(step, *inputs_with_t(6, device))


def test_dynamic_sequence_length_compiles_once(device):
    # aot_eager traces exactly what inductor receives (dynamo graph, fake kernels with a
    # symbolic T, AOT autograd) without inductor's code generation, which the test above
    # covers and which takes half a minute on two cores.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(train_step, fullgraph=True, backend=counter)
    for t in (5, 9):
        policy, ref, labels = inputs_with_t(t, device)
        for tensor in (policy, ref, labels):
            torch._dynamo.mark_dynamic(tensor, 1)
        assert_matches_eager(step, policy, ref, labels)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs for two T"
