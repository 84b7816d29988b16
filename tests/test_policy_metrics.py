"""The policy metrics of the token-stats ops (entropy, logit_mean, label_is_argmax: TRL's
definitions, csrc/tdpo_math.h) against the float64 oracle, on each device: whole rows and
tiles folded in any order, every dtype pair, offsets up to 1e4, -inf columns, masked
rows, and argmax ties (the first maximal column, as torch.argmax). With the metrics off
they are empty and the other outputs are the same bits as with them on."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
import tdpo_ext
from compare import assert_within
from error_bounds import ENTROPY_ULPS, EPS32, LOGIT_MEAN_ULPS
from inputs import DTYPES, build, draw_case
from strategies import cases, tile_edges
from test_token_stats_tile import tiled_token_stats

ops = torch.ops.tdpo_ext


def assert_metrics_match(outputs, terms: oracle.PolicyMetricTerms, name: str, scale=1):
    """The metrics of a token-stats op's eight outputs against the oracle's (positions
    0..T-2; position T-1 predicts nothing and must be 0), within `scale` times the bounds
    of error_bounds.py; label_is_argmax exactly."""
    entropy, logit_mean, label_is_argmax = outputs[5:]

    def padded(t):
        return torch.nn.functional.pad(t, (0, 1))

    assert entropy.dtype == logit_mean.dtype == torch.float32, name
    assert label_is_argmax.dtype == torch.bool, name
    assert_within(entropy, padded(terms.entropy), rtol=0.0, name=f"entropy, {name}",
                  atol=scale * ENTROPY_ULPS * EPS32 * padded(terms.entropy_magnitude))
    assert_within(logit_mean, padded(terms.logit_mean), rtol=0.0, name=f"logit_mean, {name}",
                  atol=scale * LOGIT_MEAN_ULPS * EPS32 * padded(terms.logit_magnitude))
    assert torch.equal(label_is_argmax.cpu(), padded(terms.label_is_argmax)), \
        f"label_is_argmax, {name}: {label_is_argmax} != {terms.label_is_argmax}"


def assert_same_without_metrics(with_metrics, without, name: str):
    """Metrics off: the three metrics are empty and the five statistics bitwise those of
    the run with them on."""
    for i, (on, off) in enumerate(zip(with_metrics[:5], without[:5])):
        assert torch.equal(on, off), f"{name}: output {i} differs with the metrics on"
    assert [t.shape for t in without[5:]] == [(0,)] * 3, name
    assert [t.dtype for t in without[5:]] == [t.dtype for t in with_metrics[5:]], name


def check_case(case, device, edges, order):
    policy, ref, labels = build(case, device, policy_requires_grad=False)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    terms = oracle.policy_metric_terms(policy.cpu(), labels.cpu(), case.ignore_index)
    whole = ops.token_stats(policy, ref, targets, case.ignore_index, True)
    assert_metrics_match(whole, terms, "whole rows")
    assert_same_without_metrics(whole, ops.token_stats(policy, ref, targets, case.ignore_index),
                                "whole rows")
    tiled = [tiled_token_stats(policy, ref, targets, case.ignore_index, edges, order=order,
                               policy_metrics=metrics) for metrics in (True, False)]
    assert_metrics_match(tiled[0], terms, f"tiles {edges} folded in order {order}")
    assert_same_without_metrics(*tiled, "tiles")


@settings(max_examples=25)  # half the profile's: the tests below pin the rarer classes
@given(case=cases(), data=st.data())
def test_metrics_match_oracle(device, case, data):
    """Any case (dtypes, layouts, offsets up to 1e4, masks): whole rows, and tiles folded
    in a random order."""
    edges = data.draw(tile_edges(case.v))
    order = data.draw(st.permutations(range(len(edges) - 1)))
    check_case(case, device, edges, order)


@pytest.mark.parametrize("policy_dtype", DTYPES)
@pytest.mark.parametrize("ref_dtype", DTYPES)
def test_every_dtype_pair(device, policy_dtype, ref_dtype):
    """Each (policy, reference) dtype pair: a drawn case over several CPU chunks, at an
    offset of 1e4, tiles folded right to left."""
    case = draw_case(random.Random(7), v=4100, policy_dtype=policy_dtype, ref_dtype=ref_dtype,
                     offset=1e4, mask_rate=0.3)
    edges = [0, 1, 2047, 3000, 4100]
    check_case(case, device, edges, order=[3, 2, 1, 0])


def test_minus_inf_columns(device):
    """-inf policy logits (masked vocabulary entries) in row 0 only, at offset 100: every
    7th column and the first 2100 (an all -inf CPU chunk and an all -inf tile). The
    entropy stays finite and as precise as elsewhere, logit_mean is -inf exactly where a
    -inf column exists, and a label on a -inf column is not the argmax."""
    gen = torch.Generator().manual_seed(5)
    vocab = 5000
    policy = 100 + 3 * torch.randn(2, 4, vocab, generator=gen)
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[:2100] = True
    banned[::7] = True
    policy[0] = policy[0].masked_fill(banned, float("-inf"))
    ref = policy.detach().clone().masked_fill(banned, float("-inf"))
    labels = torch.randint(2100, vocab, (2, 4), generator=gen)
    labels[0, 1] = policy[0, 0].argmax()  # a label that is the argmax, in the -inf row
    labels[0, 2] = 2107                   # a label on a -inf column
    labels[1, 2] = -100                   # a masked position
    terms = oracle.policy_metric_terms(policy, labels)
    targets = tdpo_ext.shift_labels(labels).to(device)
    policy, ref = policy.to(device), ref.to(device)
    for name, outputs in (
            ("whole rows", ops.token_stats(policy, ref, targets, -100, True)),
            ("tiles", tiled_token_stats(policy, ref, targets, -100, [0, 2100, 3000, vocab],
                                        order=[2, 0, 1], policy_metrics=True))):
        entropy, logit_mean, label_is_argmax = (t[:, :-1].cpu() for t in outputs[5:])
        assert bool(torch.isfinite(entropy).all()), f"{name}: {entropy}"
        assert bool((logit_mean[0] == float("-inf")).all()), name
        assert bool(torch.isfinite(logit_mean[1]).all()), name
        assert bool(label_is_argmax[0, 0]) and not bool(label_is_argmax[0, 1]), name
        assert_metrics_match(outputs, terms, name)


def tied_rows(dtype):
    """(policy (1, T, 5000) in dtype, labels (1, T), tile edges): rows whose maximum 4.0
    is held by several columns, with the label at the first of them (torch.argmax: True)
    or at a later one (False): within one SIMD vector, across the CPU's 2048-column
    chunks, across tiles, and in a row of equal logits."""
    vocab = 5000
    # (columns holding the maximum, label column)
    rows = [((10, 11, 4000), 10), ((10, 11, 4000), 11), ((10, 11, 4000), 4000),
            ((2999, 3000), 2999), ((2999, 3000), 3000), ((1500, 2500), 2500),
            (tuple(range(vocab)), 0), (tuple(range(vocab)), 4999)]
    gen = torch.Generator().manual_seed(9)
    # Values below the maximum on a coarse grid: ties among them too, in every dtype.
    policy = torch.randint(-8, 4, (1, len(rows) + 1, vocab), generator=gen).to(dtype)
    labels = torch.full((1, len(rows) + 1), -100)
    for t, (columns, label) in enumerate(rows):
        policy[0, t, list(columns)] = 4.0
        labels[0, t + 1] = label  # logits at t predict labels at t + 1
    return policy, labels, [0, 7, 11, 2000, 2999, 3000, 3001, vocab]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_ties(device, dtype):
    policy, labels, edges = tied_rows(dtype)
    targets = tdpo_ext.shift_labels(labels).to(device)
    want = [True, False, False, True, False, False, True, False]
    expected = (policy.argmax(-1) == targets.cpu())[0, :len(want)].tolist()
    assert expected == want  # the rows are what they say, by torch.argmax's rule
    policy = policy.to(device)
    tiles = len(edges) - 1
    for name, outputs in [("whole rows", ops.token_stats(policy, policy, targets, -100, True))] + [
            (f"tiles in order {order}",
             tiled_token_stats(policy, policy, targets, -100, edges, order=order,
                               policy_metrics=True))
            for order in (list(range(tiles)), list(range(tiles))[::-1], [3, 0, 6, 2, 5, 1, 4])]:
        assert outputs[7][0, :len(want)].tolist() == want, name
