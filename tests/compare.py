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
