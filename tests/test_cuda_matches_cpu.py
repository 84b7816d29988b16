"""The CUDA kernels against the CPU kernels on the table of kernel cases
(tests/kernel_cases.py, checks in tests/kernel_checks.py), on a CUDA device where there is
one and on every machine through the CUDA emulation (tests/cuda_kernels.py). (On a GPU
each is also checked against the oracle through the device fixture; this compares them
directly, lse included, which the public functions do not expose.)"""
import pytest
import torch

import cuda_kernels
import oracle
import tdpo_ext
from inputs import LABEL_LAYOUTS, LAYOUTS
from kernel_cases import BLOCK_VOCABS, CASES, DTYPE_PAIRS, WARP_VOCABS, ignore_indices
from kernel_checks import (first_bad_label, neg_inf_logits, preference_loss, tie_patterns,
                           tied_maxima, tiles, whole_rows)


@pytest.fixture(scope="module", params=["cuda", "emulated"])
def kernels(request) -> cuda_kernels.Kernels:
    if request.param == "cuda":
        if not (torch.cuda.is_available() and tdpo_ext.built_with_cuda()):
            pytest.skip("needs a GPU and the CUDA kernels")
        return cuda_kernels.cuda_device()
    missing = cuda_kernels.missing_build_tools()
    if missing:
        pytest.skip(missing)
    return cuda_kernels.load_emulated()


@pytest.mark.parametrize("entry", CASES, ids=lambda entry: entry.name)
def test_kernels_match_cpu(entry, kernels):
    entry.run(kernels)


def test_table_has_every_input_class():
    """Each class of input the ops accept is in the table at least once, so that editing
    it cannot drop one unnoticed."""
    def cases_of(*checks, policy_metrics=(False, True)):
        return [e.inputs for e in CASES if e.check in checks and e.policy_metrics in policy_metrics]

    _assert_row_classes(cases_of(whole_rows), policy_metrics=False)
    _assert_row_classes(cases_of(whole_rows, policy_metrics=(True,)), policy_metrics=True)

    tile_cases = cases_of(tiles)
    assert {t.case.v > 2048 for t in tile_cases} == {True, False}
    assert all(len(t.edges) >= 3 for t in tile_cases), "vocab_start != 0 in every tile case"
    assert any(t.edges[1] <= t.case.ignore_index < t.case.v for t in tile_cases)
    assert {c.v > 2048 for c in cases_of(neg_inf_logits, first_bad_label)} == {True, False}
    assert {p.variant for p in cases_of(preference_loss)} == set(oracle.VARIANTS)
    assert max(len(p.values[0]) for p in cases_of(preference_loss)) > 256  # two blocks
    assert len({e.name for e in CASES}) == len(CASES), "names identify the cases"

    # With the policy metrics: tiles (vocab_start != 0) on a warp and a block per row and
    # an empty batch of them, -inf columns on both, bad labels; every tie pattern, the far
    # ones with the label's tie and the other in different tiles, on both teams. Without
    # them: the tile kernels, -inf columns on both teams, bad labels.
    metrics_on, metrics_off = dict(policy_metrics=(True,)), dict(policy_metrics=(False,))
    tiled = cases_of(tiles, tied_maxima, **metrics_on)
    assert {t.case.v > 2048 for t in tiled} == {True, False}
    assert any(t.case.n == 0 for t in tiled)
    assert cases_of(tiles, **metrics_off)
    for with_flag in (metrics_on, metrics_off):
        assert {c.v > 2048 for c in cases_of(neg_inf_logits, **with_flag)} == {True, False}
        assert cases_of(first_bad_label, **with_flag)
    assert not cases_of(tied_maxima, **metrics_off), "ties are about label_is_argmax"
    ties = cases_of(tied_maxima)
    assert {t.case.v > 2048 for t in ties} == {True, False}
    for t in ties:
        unmasked_rows = t.case.n - len(t.case.masked_rows)
        assert t.case.mask_rate == 0 and unmasked_rows * (t.case.t - 1) >= len(
            tie_patterns(t.case.v, t.edges[1])), "a token for every tie pattern"
        assert 1 < t.edges[1] and t.edges[-2] <= t.case.v - 2, "the far ties in other tiles"


def _assert_row_classes(rows, policy_metrics: bool) -> None:
    row_classes = {
        "dtype pairs": ({(c.policy_dtype, c.ref_dtype) for c in rows}, set(DTYPE_PAIRS)),
        "warp and block vocabularies": ({c.v for c in rows}, {*WARP_VOCABS, *BLOCK_VOCABS}),
        "policy layouts": ({c.policy_layout for c in rows}, set(LAYOUTS)),
        "reference layouts": ({c.ref_layout for c in rows}, set(LAYOUTS)),
        "label layouts": ({c.labels_layout for c in rows}, set(LABEL_LAYOUTS)),
        "ignore indices (-100, 0, another id)": (
            {k for c in rows for k, i in enumerate(ignore_indices(c.v)) if i == c.ignore_index},
            {0, 1, 2}),
        # A warp per row: 8 rows per block, a last block partly filled.
        "ragged blocks": ({c.n * c.t % 8 != 0 for c in rows if c.v <= 2048}, {True}),
        "masked rows": ({bool(c.masked_rows) for c in rows}, {True, False}),
        "empty batch": ({c.n == 0 for c in rows}, {True, False}),
    }
    if policy_metrics:  # the classes that matter to the metrics; the others as they fall
        row_classes = {name: row_classes[name] for name in (
            "warp and block vocabularies", "ignore indices (-100, 0, another id)",
            "ragged blocks", "masked rows", "empty batch")}
    for name, (have, want) in row_classes.items():
        assert want <= have, (f"no kernel case of {name} {want - have}"
                              f"{' with the policy metrics' if policy_metrics else ''}")
