"""Element-wise comparison with a per-element absolute tolerance (torch.testing takes a
single atol, but the rounding the kernels may do differs from element to element)."""
from __future__ import annotations

import torch


def assert_within(actual: torch.Tensor, expected: torch.Tensor, *, atol, rtol: float,
                  name: str) -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere; atol may be a tensor
    broadcastable to expected. Infinities must match exactly; NaN never passes."""
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    allowed = torch.as_tensor(atol, dtype=torch.float64).cpu() + rtol * e.abs()
    ok = (a == e) | ((a - e).abs() <= allowed)
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        i = tuple(bad[0].tolist())
        allowed_i = allowed.expand_as(e)[i].item()
        raise AssertionError(
            f"{name}: {len(bad)} of {e.numel()} elements out of tolerance; first at {i}: "
            f"got {a[i].item()!r}, expected {e[i].item()!r}, |diff| "
            f"{(a[i] - e[i]).abs().item():.3g} > allowed {allowed_i:.3g}")


# Two runs of the same training that reduce the same gradients in another order (two
# processes against one, a sharded reduce-scatter against a local sum) differ in the last
# bits of every gradient element. Where an element's gradient is far from zero against
# that rounding, the runs' updates differ by as little. Where it is a near-cancelling sum
# (the per-token contributions nearly add up to zero), the rounding can be as large as the
# gradient itself and change its sign, and Adam, which divides the gradient by its own
# running magnitude, turns that into a full step the other way: a difference of the order
# of lr per step, on some CPUs and not others (the order of a sum depends on the SIMD
# width). Whether an element is such a sum depends on the sum of the contributions'
# magnitudes, which no run records; so the parameters are held to what Adam can move them,
# and the tight checks are on the metrics each run logs (losses, rewards, KL, gradient
# norms), into which every element's gradient goes and which a gradient not reduced
# across processes changes at once.
#
# What Adam can move one element in a step t (AdamW with bias correction, torch's and
# DeepSpeed's): u_t = m_t / (sqrt(v_t) + eps), with
#     m_t = sum_i a_i g_i,   a_i = (1 - b1) b1^(t-i) / (1 - b1^t),
#     v_t = sum_i c_i g_i^2, c_i = (1 - b2) b2^(t-i) / (1 - b2^t),
# over the gradients g_1..g_t of that element. By Cauchy-Schwarz,
#     |m_t| <= sum_i (a_i / sqrt(c_i)) sqrt(c_i) |g_i| <= R_t sqrt(v_t),
#     R_t = sqrt(sum_i a_i^2 / c_i),
# whatever the gradients are, so |u_t| < R_t (eps > 0 only shrinks it; R_1 = 1, and with
# b1 = 0.9, b2 = 0.999, R_2 = 1.0014, R_3 = 1.0036, R_10 = 1.04). A step is
# theta <- theta (1 - lr_t wd) - lr_t u_t; two runs from the same start, with lr_t <= lr
# and 0 <= lr wd <= 1 (decay shrinks a difference), therefore differ by at most
#     2 lr (R_1 + ... + R_k)
# after k steps, plus float32 rounding: each run rounds each step's three operations (decay,
# division, subtraction) to 2^-24 of values at most |theta| + lr R_t, so 6 k 2^-24
# (|theta| + reach) for both runs together.
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def adam_reach(lr: float, steps: int, betas=(0.9, 0.999)) -> float:
    """The most AdamW (bias-corrected, learning rates up to lr) moves one element in
    `steps` steps from the start, whatever its gradients: lr (R_1 + ... + R_steps)."""
    b1, b2 = betas
    reach = 0.0
    for t in range(1, steps + 1):
        a = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
        c = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
        reach += sum(x * x / y for x, y in zip(a, c)) ** 0.5
    return lr * reach


def assert_adam_alike(actual: dict, expected: dict, *, lr: float, steps: int,
                      betas=(0.9, 0.999), name: str = "") -> None:
    """Parameters (name -> tensor) of two runs of `steps` AdamW steps from the same start
    on the same data, whose gradients differ only in rounding: each element within what
    Adam can move it in both runs, 2 adam_reach, plus their float32 rounding (derivation
    above). Checks that both saved the trained parameters of the same start; the metrics
    carry the tight check."""
    assert actual.keys() == expected.keys(), f"{name}: {sorted(actual)} != {sorted(expected)}"
    reach = adam_reach(lr, steps, betas)
    for key, e in expected.items():
        rounding = 6 * steps * FLOAT32_UNIT_ROUNDOFF * (e.detach().abs().cpu().double() + reach)
        assert_within(actual[key], e, atol=2 * reach + rounding, rtol=0.0,
                      name=f"{name} {key}".strip())
