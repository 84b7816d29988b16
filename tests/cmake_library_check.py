"""Loads the CMake-built library (argv[1]) with torch.ops.load_library and checks its ops
against plain torch. Run by test_cmake.py in a process of its own: the tdpo_ext package
registers the same op namespace, so it must not be imported here."""
import sys

import torch
import torch.nn.functional as F

torch.ops.load_library(sys.argv[1])
ops = torch.ops.tdpo_ext
IGNORE = -100

gen = torch.Generator().manual_seed(0)
policy = torch.randn(2, 4, 11, generator=gen) * 3
ref = torch.randn(2, 4, 11, generator=gen) * 3
targets = torch.randint(0, 11, (2, 4), generator=gen)
targets[1, 1:] = IGNORE
keep = targets != IGNORE

logp_pol, logp_ref, token_kl, lse_pol, lse_ref = ops.token_stats(policy, ref, targets, IGNORE)[:5]
logp_x, logp_r = policy.double().log_softmax(-1), ref.double().log_softmax(-1)
y = targets.clamp(min=0).unsqueeze(-1)
expected = {
    "logp_pol": logp_x.gather(-1, y).squeeze(-1),
    "logp_ref": logp_r.gather(-1, y).squeeze(-1),
    "token_kl": (logp_r.exp() * (logp_r - logp_x)).sum(-1),
    "lse_pol": policy.double().logsumexp(-1),
    "lse_ref": ref.double().logsumexp(-1),
}
for name, got in zip(expected, (logp_pol, logp_ref, token_kl, lse_pol, lse_ref)):
    torch.testing.assert_close(got.double(), expected[name] * keep, rtol=1e-5, atol=1e-5,
                               msg=lambda m, name=name: f"{name}: {m}")

grad_logp, grad_kl = torch.randn(2, 2, 4, generator=gen)
grad = ops.token_stats_backward(grad_logp, grad_kl, policy, ref, targets, lse_pol, lse_ref,
                                IGNORE)
p, q = logp_x.exp(), logp_r.exp()
onehot = F.one_hot(y.squeeze(-1), 11).double()
expected_grad = (grad_logp.unsqueeze(-1) * (onehot - p) + grad_kl.unsqueeze(-1) * (p - q))
torch.testing.assert_close(grad.double(), expected_grad * keep.unsqueeze(-1), rtol=1e-5,
                           atol=1e-6)

mc, mr, kc, kr = torch.randn(4, 3, generator=gen)
for variant, z in (("tdpo1", mc - mr - (kr - kc)), ("tdpo2", mc - mr - 0.5 * (kr - kc)),
                   ("dpo", mc - mr)):
    losses, chosen_rewards, rejected_rewards = ops.preference_loss(mc, mr, kc, kr, 0.1, 0.5,
                                                                   variant)
    torch.testing.assert_close(losses, -F.logsigmoid(0.1 * z))
    torch.testing.assert_close(chosen_rewards, 0.1 * (mc + kc))
    torch.testing.assert_close(rejected_rewards, 0.1 * (mr + kr))

assert isinstance(ops.built_with_cuda(), bool)
if not ops.built_with_cuda():
    # Every op that has a CPU kernel refuses CUDA tensors with the library's own message
    # (csrc/no_cuda_kernels.cpp); token_stats is sent to its CUDA implementation here.
    device_ops = [name for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                  if name.startswith("tdpo_ext::")]
    assert len(device_ops) == 6, device_ops
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
               for name in device_ops), device_ops
    as_if_on_cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    try:
        ops.token_stats.default.redispatch(as_if_on_cuda, policy, ref, targets, IGNORE)
    except RuntimeError as error:
        assert "CUDA tensors reached a build of tdpo_ext without CUDA kernels" in str(error)
    else:
        raise AssertionError("token_stats ran on 'CUDA' in a library without CUDA kernels")
assert ops.cpu_kernel_capability() in ("DEFAULT", "AVX2", "AVX512")
assert "tdpo_ext" not in sys.modules
print("cmake library ok:", ops.cpu_kernel_capability(), "kernels")
