"""What the table of kernel cases (tests/kernel_cases.py) checks: each function runs the
CUDA kernels (on a device or emulated, tests/cuda_kernels.py) and the CPU ops on the
inputs of one case, and holds the kernels' results within error_bounds' tolerances of the
CPU ops' (lse included, which the public functions do not expose), or checks the error
they raise. Each raises AssertionError (or the kernels' own error) on a mismatch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import error_bounds
import oracle
import tdpo_ext
from compare import assert_within
from cuda_kernels import Kernels
from error_bounds import EPS32, pair_atols, policy_grad_scale
from inputs import Case, build, labels_in_layout

# Each device is within error_bounds' tolerances of the oracle (test_sequence_stats.py,
# test_preference_loss.py), so the two are within twice those of each other.
RTOL = 2 * error_bounds.RTOL
ULPS = 2 * error_bounds.ULPS
GRAD_RTOL = {dtype: 2 * rtol for dtype, rtol in error_bounds.GRAD_RTOL.items()}
GRAD_ATOL = {dtype: 2 * atol for dtype, atol in error_bounds.GRAD_ATOL.items()}
STAT_NAMES = ("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref")


@dataclass(frozen=True)
class TileCase:
    """A Case cut into tiles of vocabulary columns [edges[k], edges[k + 1])."""
    case: Case
    edges: tuple[int, ...]


@dataclass(frozen=True)
class PairCase:
    """The four float32 inputs of preference_loss (inputs.draw_pair_values) and its
    arguments."""
    values: tuple[tuple[float, ...], ...]
    beta: float
    alpha: float
    variant: str
    seed: int


def targets_on(case: Case, labels: torch.Tensor, device: str) -> torch.Tensor:
    """The targets the ops get (labels shifted), in the case's labels layout on device:
    the public functions make them contiguous, the ops read any strides."""
    targets = tdpo_ext.shift_labels(labels.cpu(), case.ignore_index).to(device)
    return labels_in_layout(targets, case.labels_layout, case.v)


def upstream_grads(case: Case, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d (logp_pol, token_kl) per token; every other position gets no KL
    gradient, as TDPO2's chosen rows: the backward does not read their reference."""
    grad_logp, grad_kl = torch.randn((2, *shape),
                                     generator=torch.Generator().manual_seed(case.seed))
    grad_kl[:, ::2] = 0.0
    return grad_logp, grad_kl


def _assert_stats_within(got, want, tokens: oracle.TokenTerms, what: str) -> None:
    magnitude = torch.nn.functional.pad(tokens.magnitude, (0, 1))  # position T-1: 0
    for name, g, w in zip(STAT_NAMES, got, want):
        assert_within(g, w, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=f"{what}{name}")


def _grad_atol(case: Case, tokens: oracle.TokenTerms, grad_logp, grad_kl) -> torch.Tensor:
    scale = policy_grad_scale(tokens, grad_logp[:, :-1].double(), grad_kl[:, :-1].double(),
                              coef_error=1.0)
    return ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype]


def _compare_whole_rows(case: Case, labels, cpu_logits, kernel_logits,
                        kernels: Kernels) -> None:
    """token_stats and token_stats_backward on (policy, ref) logits and the case's targets,
    the CPU op on cpu_logits, the kernels on kernel_logits (the same values)."""
    targets = targets_on(case, labels, "cpu")
    targets_k = targets_on(case, labels, kernels.device)
    cpu = torch.ops.tdpo_ext.token_stats(*cpu_logits, targets, case.ignore_index)
    got = kernels.ops.token_stats(*kernel_logits, targets_k, case.ignore_index)
    tokens = oracle.token_terms(*cpu_logits, labels.cpu(), case.ignore_index)
    _assert_stats_within(got, cpu, tokens, "")

    grad_logp, grad_kl = upstream_grads(case, targets.shape)
    grad_cpu = torch.ops.tdpo_ext.token_stats_backward(
        grad_logp, grad_kl, *cpu_logits, targets, cpu[3], cpu[4], case.ignore_index)
    d = kernels.device
    grad = kernels.ops.token_stats_backward(grad_logp.to(d), grad_kl.to(d), *kernel_logits,
                                            targets_k, got[3], got[4], case.ignore_index)
    assert grad.dtype == grad_cpu.dtype == case.policy_dtype, (grad.dtype, grad_cpu.dtype)
    assert grad.is_contiguous(), grad.stride()
    assert_within(grad, grad_cpu, rtol=GRAD_RTOL[case.policy_dtype],
                  atol=_grad_atol(case, tokens, grad_logp, grad_kl), name="grad policy_logits")


def whole_rows(case: Case, kernels: Kernels) -> None:
    """token_stats and its backward, the logits in the case's layouts on each device."""
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    policy_k, ref_k = build(case, kernels.device, policy_requires_grad=False)[:2]
    _compare_whole_rows(case, labels, (policy, ref), (policy_k, ref_k), kernels)


def neg_inf_logits(case: Case, kernels: Kernels) -> None:
    """-inf at the same places in both models (finite KL): the first half of row (0, 0)
    (whole vector chunks, threads whose every element is -inf) and every third column of
    row (0, 1); the labels of those rows finite. Needs T >= 3."""
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    banned = torch.zeros(policy.shape, dtype=torch.bool)
    banned[0, 0, : case.v // 2] = True
    banned[0, 1, 1::3] = True
    policy, ref = (x.masked_fill(banned, float("-inf")) for x in (policy, ref))
    labels[0, 1], labels[0, 2] = case.v - 1, 0  # predicted by rows (0, 0) and (0, 1)
    _compare_whole_rows(case, labels, (policy, ref),
                        (policy.to(kernels.device), ref.to(kernels.device)), kernels)


def tiles(tile_case: TileCase, kernels: Kernels) -> None:
    """token_stats_tile over the tiles, then token_stats_finish, and token_stats_backward
    per tile with vocab_start = its first column; the labels set so that every tile holds
    some (the label inside the tile, at columns vocab_start + k)."""
    case, edges = tile_case.case, tile_case.edges
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    starts = torch.tensor(edges[:-1])
    widths = torch.tensor(edges[1:]) - starts
    unmasked = labels[:, 1:] != case.ignore_index
    k = torch.arange(int(unmasked.sum()))
    labels[:, 1:][unmasked] = starts[k % len(starts)] + k // len(starts) % widths[k % len(starts)]
    pairs = list(zip(edges, edges[1:]))
    stats, inputs = {}, {}
    for name, ops, device in (("cpu", torch.ops.tdpo_ext, "cpu"),
                              ("kernels", kernels.ops, kernels.device)):
        p, r = build(case, device, policy_requires_grad=False)[:2]
        y = targets_on(case, labels, device)
        state = None
        for v0, v1 in pairs:
            state = ops.token_stats_tile(p[..., v0:v1], r[..., v0:v1], y, case.ignore_index,
                                         v0, state)
        assert state.shape == (*y.shape, 7), state.shape
        stats[name] = ops.token_stats_finish(state, y, case.ignore_index)
        inputs[name] = (p, r, y)
    tokens = oracle.token_terms(policy, ref, labels, case.ignore_index)
    _assert_stats_within(stats["kernels"], stats["cpu"], tokens, "tiled ")

    grad_logp, grad_kl = upstream_grads(case, labels.shape)
    atol = _grad_atol(case, tokens, grad_logp, grad_kl)
    lse = stats["cpu"][3:]
    d = kernels.device
    for v0, v1 in pairs:
        want = torch.ops.tdpo_ext.token_stats_backward(
            grad_logp, grad_kl, inputs["cpu"][0][..., v0:v1], inputs["cpu"][1][..., v0:v1],
            inputs["cpu"][2], *lse, case.ignore_index, v0)
        got = kernels.ops.token_stats_backward(
            grad_logp.to(d), grad_kl.to(d), inputs["kernels"][0][..., v0:v1],
            inputs["kernels"][1][..., v0:v1], inputs["kernels"][2], *(x.to(d) for x in lse),
            case.ignore_index, v0)
        assert_within(got, want, rtol=GRAD_RTOL[case.policy_dtype], atol=atol[..., v0:v1],
                      name=f"grad of the tile at {v0}")


def first_bad_label(case: Case, kernels: Kernels) -> None:
    """Bad labels (V, -5, V + 4) at three positions, in rows that different teams and
    blocks handle: the error names the first (smallest row, then position), which the
    kernels find by atomicMin, with the CPU op's message; the kernels then still run."""
    policy, ref, labels = build(case, kernels.device, policy_requires_grad=False)
    targets = targets_on(case, labels, kernels.device)
    rows = targets.numel()
    planted = {rows // 3: case.v, 2 * rows // 3: -5, rows - 1: case.v + 4}
    bad = targets.clone()
    for position, label in planted.items():
        bad[divmod(position, case.t)] = label
    first = min(planted)
    row, position = divmod(first, case.t)
    message = (f"labels holds {planted[first]} at row {row} (predicted by logits position "
               f"{position}), outside the vocabulary [0, {case.v})")
    try:
        kernels.ops.token_stats(policy, ref, labels_in_layout(bad, case.labels_layout, case.v),
                                case.ignore_index)
    except RuntimeError as error:
        assert message in str(error), f"expected {message!r} in:\n{error}"
    else:
        raise AssertionError(f"bad labels {planted} raised nothing")
    # No sticky error, as a device-side assert would leave.
    lse_pol = kernels.ops.token_stats(policy, ref, targets, case.ignore_index)[3]
    assert bool(torch.isfinite(lse_pol).all().cpu())


def preference_loss(pair: PairCase, kernels: Kernels) -> None:
    """preference_loss and its backward; an input the variant ignores (or stops the
    gradient of) gets exactly 0."""
    inputs = [torch.tensor(v, dtype=torch.float32) for v in pair.values]
    upstream = torch.randn(len(pair.values[0]),
                           generator=torch.Generator().manual_seed(pair.seed))
    args = (pair.beta, pair.alpha, pair.variant)
    atols = pair_atols(*inputs, upstream, pair.beta, pair.alpha)
    d = kernels.device
    for name, c, g in zip(
            ("losses", "chosen_rewards", "rejected_rewards"),
            torch.ops.tdpo_ext.preference_loss(*inputs, *args),
            kernels.ops.preference_loss(*(t.to(d) for t in inputs), *args)):
        assert_within(g, c, rtol=RTOL, atol=2 * getattr(atols, name), name=name)
    for name, c, g in zip(
            ("chosen_logps_margin", "rejected_logps_margin", "chosen_kl", "rejected_kl"),
            torch.ops.tdpo_ext.preference_loss_backward(upstream, *inputs, *args),
            kernels.ops.preference_loss_backward(upstream.to(d), *(t.to(d) for t in inputs),
                                                 *args)):
        atol = 2 * atols.grads if bool(c.any()) else 0.0
        assert_within(g, c, rtol=RTOL, atol=atol, name=f"grad {name}")


def name_of(case: Case) -> str:
    dtypes = f"{case.policy_dtype}/{case.ref_dtype}".replace("torch.", "")
    return (f"{case.n}x{case.t}x{case.v}-{dtypes}-{case.policy_layout}/{case.ref_layout}-"
            f"labels_{case.labels_layout}-ignore{case.ignore_index}")
