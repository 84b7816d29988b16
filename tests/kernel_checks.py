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
METRIC_NAMES = ("entropy", "logit_mean", "label_is_argmax")


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


def _per_token(values: torch.Tensor) -> torch.Tensor:
    """(N, T-1) values of the positions that predict a label, as (N, T): position T-1 0."""
    return torch.nn.functional.pad(values, (0, 1))


def metric_atols(policy: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) absolute tolerances of entropy and logit_mean (0 where masked): each device
    is within error_bounds' ENTROPY_ULPS / LOGIT_MEAN_ULPS of the oracle's magnitudes, so
    the two are within twice those of each other."""
    terms = oracle.policy_metric_terms(policy, labels, ignore_index)
    return (_per_token(2 * error_bounds.ENTROPY_ULPS * EPS32 * terms.entropy_magnitude),
            _per_token(2 * error_bounds.LOGIT_MEAN_ULPS * EPS32 * terms.logit_magnitude))


def _assert_stats_within(got, want, tokens: oracle.TokenTerms, metrics_atol, what: str) -> None:
    """The eight outputs of token_stats (or token_stats_finish) of the kernels, got,
    against the CPU op's, want: with metrics_atol (metric_atols), the policy metrics within
    those, label_is_argmax exactly; without, their outputs empty."""
    magnitude = _per_token(tokens.magnitude)
    for name, g, w in zip(STAT_NAMES, got, want):
        assert_within(g, w, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=f"{what}{name}")
    metrics, want_metrics = got[len(STAT_NAMES):], want[len(STAT_NAMES):]
    if metrics_atol is None:
        for name, g in zip(METRIC_NAMES, metrics):
            assert g.shape == (0,), f"{what}{name} without policy_metrics: {tuple(g.shape)}"
        return
    for name, g, w, atol in zip(METRIC_NAMES[:2], metrics, want_metrics, metrics_atol):
        assert_within(g, w, rtol=RTOL, atol=atol, name=f"{what}{name}")
    got_top1, want_top1 = metrics[2].cpu(), want_metrics[2]
    assert got_top1.dtype == want_top1.dtype == torch.bool, (got_top1.dtype, want_top1.dtype)
    differ = (got_top1 != want_top1).nonzero().tolist()
    assert not differ, (f"{what}label_is_argmax differs at {len(differ)} tokens, first "
                        f"{differ[0]}: got {bool(got_top1[tuple(differ[0])])}")


def _metrics_atol(case: Case, labels, cpu_logits, policy_metrics: bool):
    return metric_atols(cpu_logits[0], labels.cpu(), case.ignore_index) if policy_metrics else None


def _grad_atol(case: Case, tokens: oracle.TokenTerms, grad_logp, grad_kl) -> torch.Tensor:
    scale = policy_grad_scale(tokens, grad_logp[:, :-1].double(), grad_kl[:, :-1].double(),
                              coef_error=1.0)
    return ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype]


def _compare_whole_rows(case: Case, labels, cpu_logits, kernel_logits, kernels: Kernels,
                        policy_metrics: bool) -> None:
    """token_stats and token_stats_backward on (policy, ref) logits and the case's targets,
    the CPU op on cpu_logits, the kernels on kernel_logits (the same values)."""
    targets = targets_on(case, labels, "cpu")
    targets_k = targets_on(case, labels, kernels.device)
    cpu = torch.ops.tdpo_ext.token_stats(*cpu_logits, targets, case.ignore_index,
                                         policy_metrics)
    got = kernels.ops.token_stats(*kernel_logits, targets_k, case.ignore_index, policy_metrics)
    tokens = oracle.token_terms(*cpu_logits, labels.cpu(), case.ignore_index)
    _assert_stats_within(got, cpu, tokens, _metrics_atol(case, labels, cpu_logits, policy_metrics),
                         "")

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


def whole_rows(case: Case, kernels: Kernels, policy_metrics: bool = False) -> None:
    """token_stats and its backward, the logits in the case's layouts on each device."""
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    policy_k, ref_k = build(case, kernels.device, policy_requires_grad=False)[:2]
    _compare_whole_rows(case, labels, (policy, ref), (policy_k, ref_k), kernels,
                        policy_metrics)


def neg_inf_logits(case: Case, kernels: Kernels, policy_metrics: bool = False) -> None:
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
                        (policy.to(kernels.device), ref.to(kernels.device)), kernels,
                        policy_metrics)


def _compare_tiles(case: Case, edges, labels, cpu_logits, kernel_logits, kernels: Kernels,
                   policy_metrics: bool) -> None:
    """token_stats_tile over the tiles [edges[k], edges[k + 1]), then token_stats_finish,
    and token_stats_backward per tile with vocab_start = its first column; the CPU ops on
    cpu_logits, the kernels on kernel_logits (the same values)."""
    pairs = list(zip(edges, edges[1:]))
    stats, inputs = {}, {}
    for name, ops, device, (p, r) in (("cpu", torch.ops.tdpo_ext, "cpu", cpu_logits),
                                      ("kernels", kernels.ops, kernels.device, kernel_logits)):
        y = targets_on(case, labels, device)
        state = None
        for v0, v1 in pairs:
            state = ops.token_stats_tile(p[..., v0:v1], r[..., v0:v1], y, case.ignore_index,
                                         v0, state, policy_metrics)
        floats = (tdpo_ext.ops.TILE_STATE_WITH_METRICS_FLOATS if policy_metrics
                  else tdpo_ext.ops.TILE_STATE_FLOATS)
        assert state.shape == (*y.shape, floats), state.shape
        stats[name] = ops.token_stats_finish(state, y, case.ignore_index)
        inputs[name] = (p, r, y)
    tokens = oracle.token_terms(*cpu_logits, labels, case.ignore_index)
    _assert_stats_within(stats["kernels"], stats["cpu"], tokens,
                         _metrics_atol(case, labels, cpu_logits, policy_metrics), "tiled ")

    grad_logp, grad_kl = upstream_grads(case, labels.shape)
    atol = _grad_atol(case, tokens, grad_logp, grad_kl)
    lse = stats["cpu"][3:5]
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


def tiles(tile_case: TileCase, kernels: Kernels, policy_metrics: bool = False) -> None:
    """The tiled ops (_compare_tiles) on the logits in the case's layouts on each device;
    the labels set so that every tile holds some (the label inside the tile, at columns
    vocab_start + k)."""
    case, edges = tile_case.case, tile_case.edges
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    starts = torch.tensor(edges[:-1])
    widths = torch.tensor(edges[1:]) - starts
    unmasked = labels[:, 1:] != case.ignore_index
    k = torch.arange(int(unmasked.sum()))
    labels[:, 1:][unmasked] = starts[k % len(starts)] + k // len(starts) % widths[k % len(starts)]
    kernel_logits = build(case, kernels.device, policy_requires_grad=False)[:2]
    _compare_tiles(case, edges, labels, (policy, ref), kernel_logits, kernels, policy_metrics)


def tie_patterns(vocab: int, first_edge: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Rows whose policy maximum is held by several columns: name -> (the label's column,
    the other columns holding the maximum). The label is the argmax (torch.argmax, the
    first maximal column) only where it comes first. Adjacent columns (mostly one thread's
    vector, sometimes two threads'), the row's two ends (other lanes of a warp, other warps
    of a block, the first and last tile) and the two columns around the first tile edge."""
    mid = vocab // 2
    return {
        "label_first_adjacent": (mid, (mid + 1,)),
        "label_later_adjacent": (mid + 1, (mid,)),
        "label_first_far": (1, (vocab - 2,)),
        "label_later_far": (vocab - 2, (1,)),
        "label_between": (mid, (0, vocab - 1)),
        "label_first_across_tile_edge": (first_edge - 1, (first_edge,)),
        "label_later_across_tile_edge": (first_edge, (first_edge - 1,)),
    }


def tied_maxima(tile_case: TileCase, kernels: Kernels, policy_metrics: bool = True) -> None:
    """label_is_argmax on tied policy maxima (tie_patterns, one per unmasked token in
    turn; the tokens after them keep their drawn rows, with the label at the row's
    argmax), whole rows and in the case's tiles: the kernels' against the CPU op's and
    against torch.argmax of the float64 policy logits. Needs contiguous policy logits."""
    case, edges = tile_case.case, tile_case.edges
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    assert policy.is_contiguous(), "the ties are planted in place"
    patterns = list(tie_patterns(case.v, edges[1]).values())
    unmasked = (labels[:, 1:] != case.ignore_index).nonzero().tolist()
    for k, (n, t) in enumerate(unmasked):
        row = policy[n, t]
        if k < len(patterns):
            label, others = patterns[k]
            # Above every drawn logit by more than an ulp of any dtype (2^-5 relative).
            top = row.double().max()
            row[[label, *others]] = (top + max(abs(top.item()), 1.0) * 2.0**-5).to(row.dtype)
        else:
            label = int(row.double().argmax())
        labels[n, t + 1] = label
    top1 = policy.double()[:, :-1].argmax(-1) == labels[:, 1:]
    want = _per_token(top1 & (labels[:, 1:] != case.ignore_index))
    kernel_logits = (policy.to(kernels.device), ref.to(kernels.device))
    _compare_whole_rows(case, labels, (policy, ref), kernel_logits, kernels, policy_metrics)
    _compare_tiles(case, edges, labels, (policy, ref), kernel_logits, kernels, policy_metrics)
    for ops, device, logits in ((torch.ops.tdpo_ext, "cpu", (policy, ref)),
                                (kernels.ops, kernels.device, kernel_logits)):
        got = ops.token_stats(*logits, targets_on(case, labels, device), case.ignore_index,
                              True)[7].cpu()
        assert torch.equal(got, want), (f"{device}: label_is_argmax {got.int().tolist()}, "
                                        f"torch.argmax gives {want.int().tolist()}")


def first_bad_label(case: Case, kernels: Kernels, policy_metrics: bool = False) -> None:
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
                                case.ignore_index, policy_metrics)
    except RuntimeError as error:
        assert message in str(error), f"expected {message!r} in:\n{error}"
    else:
        raise AssertionError(f"bad labels {planted} raised nothing")
    # No sticky error, as a device-side assert would leave.
    lse_pol = kernels.ops.token_stats(policy, ref, targets, case.ignore_index, policy_metrics)[3]
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
