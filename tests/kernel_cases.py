"""The one table of CUDA kernel cases, run by tests/test_cuda_matches_cpu.py (on a GPU and
emulated), by the sanitizer runs of tests/test_cuda_emulation.py and by scripts/gpu/
(sanitizer_case.py, under compute-sanitizer in gpu_check.sh).

Each entry pins the input class it exists for (dtypes, a vocabulary that a warp or a
block of threads owns, layouts of logits and labels, the ignore index) and draws every
other field from the generators of the CPU property tests (tests/inputs.py), from a seed
made of its pins: adding an entry changes no other. Sampled, not multiplied: every class
appears, not every combination (test_cuda_matches_cpu.py checks that each does). The
policy metrics (token_stats' policy_metrics) are on in a subset of the entries that still
holds every class of input that matters to them, off in the others.

To add a case, add an entry to the list of its kind below."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable

import oracle
from inputs import (DTYPES, LABEL_LAYOUTS, LAYOUTS, Case, draw_case, draw_pair_values,
                    draw_tile_edges, PAIR_ALPHAS, PAIR_BETAS)
from kernel_checks import (PairCase, TileCase, first_bad_label, name_of, neg_inf_logits,
                           preference_loss, tied_maxima, tiles, whole_rows)

# The kernels give a vocabulary row to a warp up to 2048 columns, to a 256-thread block
# beyond (csrc/cuda/token_stats.cu, kWarpRowMaxVocab). Warp: fewer columns than one
# 16-byte vector of bf16, an odd V (rows of a view start unaligned), the largest V a warp
# owns. Block: the smallest V a block owns, an aligned V, V >= 65536 (odd).
WARP_VOCABS = (7, 1001, 2048)
BLOCK_VOCABS = (2049, 4100, 70001)
DTYPE_PAIRS = tuple(itertools.product(DTYPES, DTYPES))


def ignore_indices(vocab: int) -> tuple[int, ...]:
    """-100, the pad id 0 and another id inside [0, V): each masks the labels equal to it."""
    return (-100, 0, vocab // 2)


@dataclass(frozen=True)
class KernelCase:
    name: str
    check: Callable  # kernel_checks' function: check(inputs, kernels[, policy_metrics])
    inputs: object   # a Case, TileCase or PairCase
    policy_metrics: bool = False  # the token_stats ops' outputs include the policy metrics

    def run(self, kernels) -> None:
        if self.policy_metrics:
            self.check(self.inputs, kernels, policy_metrics=True)
        else:
            self.check(self.inputs, kernels)


def _entry(kind: str, check: Callable, inputs, name: str, policy_metrics: bool) -> KernelCase:
    return KernelCase(f"{kind}-{name}{'-metrics' if policy_metrics else ''}", check, inputs,
                      policy_metrics)


def _seeded(pinned: dict) -> random.Random:
    return random.Random(repr(sorted(pinned.items())))  # str seeds: the same every run


def _has_unmasked_tokens(case: Case) -> bool:
    return case.t >= 2 and case.mask_rate < 1.0 and len(case.masked_rows) < case.n


def draw(*, accept: Callable[[Case], bool] = _has_unmasked_tokens, **pinned) -> Case:
    """A Case with the pinned fields, the others drawn by inputs.draw_case, redrawn until
    accept(case) (by default: some token is unmasked, so the kernels compute something)."""
    draws = _seeded(pinned)
    while not accept(case := draw_case(draws, **pinned)):
        pass
    return case


def _whole_row_cases() -> list[tuple[Case, bool]]:
    """Every dtype pair, each with a warp and a block per row; the ignore indices, label
    layouts and logits layouts cycled through across them; with the policy metrics on
    half of them, warps and blocks alike."""
    out = []
    for k, ((policy_dtype, ref_dtype), vocabs) in enumerate(
            itertools.product(DTYPE_PAIRS, (WARP_VOCABS, BLOCK_VOCABS))):
        v = vocabs[k // 2 % len(vocabs)]
        out.append((draw(policy_dtype=policy_dtype, ref_dtype=ref_dtype, v=v,
                          ignore_index=ignore_indices(v)[k % 3],
                          labels_layout=LABEL_LAYOUTS[k // 3 % len(LABEL_LAYOUTS)],
                          policy_layout=LAYOUTS[k % len(LAYOUTS)],
                          ref_layout=LAYOUTS[(k + 1 + k // len(LAYOUTS)) % len(LAYOUTS)]),
                     k % 4 in (0, 3)))
    return out


def _tile_case(**pinned) -> TileCase:
    """A Case with tiles of at least two inner edges (vocab_start != 0)."""
    edges = draw_tile_edges(_seeded(pinned), pinned["v"], min_inner=2)
    return TileCase(draw(**pinned), tuple(edges))


def _tile_cases() -> list[tuple[TileCase, bool]]:
    """Tiles with vocab_start != 0 (at least two), forward and backward, on a warp and a
    block per row; the ignore index inside a later tile on one; the policy metrics on the
    warp's and the empty batch's (a block's are in _tie_cases)."""
    out = [(_tile_case(v=v, policy_dtype=policy_dtype, ref_dtype=ref_dtype,
                       ignore_index=ignore_index, mask_rate=0.3), policy_metrics)
           for v, (policy_dtype, ref_dtype), ignore_index, policy_metrics in (
               (1001, DTYPE_PAIRS[1], 1001 // 2, True), (5003, DTYPE_PAIRS[5], 0, False))]
    empty = draw(n=0, v=4100, accept=lambda c: True)
    return out + [(TileCase(empty, (0, 2049, 4100)), True)]


def _tie_cases() -> list[TileCase]:
    """Tied policy maxima (kernel_checks.tie_patterns) on a warp and a block per row, whole
    and in tiles; contiguous policy logits, where tied_maxima plants the ties. Rows 0 and 1
    unmasked (10 tokens, a pattern each and then their argmax), row 2 masked, and 18 rows
    in all: a last block of warps partly filled."""
    return [_tile_case(v=v, n=3, t=6, policy_dtype=policy_dtype, ref_dtype=ref_dtype,
                       policy_layout="contiguous", mask_rate=0.0, masked_rows=(2,),
                       ignore_index=-100)
            for v, (policy_dtype, ref_dtype) in ((1001, (DTYPES[1], DTYPES[0])),
                                                 (4100, (DTYPES[2], DTYPES[1])))]


def _pair_cases() -> list[PairCase]:
    """Each variant; 1 pair, 300 (a second block of 256 threads, partly filled), 1000."""
    out = []
    for variant, pairs in zip(oracle.VARIANTS, (300, 1000, 1)):
        draws = _seeded(dict(variant=variant, pairs=pairs))
        values = draw_pair_values(draws, pairs)
        out.append(PairCase(tuple(map(tuple, values)), draws.choice(PAIR_BETAS),
                            draws.choice(PAIR_ALPHAS), variant, seed=pairs))
    return out


def _tiles_name(t: TileCase) -> str:
    return f"{name_of(t.case)}-edges{'_'.join(map(str, t.edges))}"


def _table() -> list[KernelCase]:
    table = [_entry("whole_rows", whole_rows, c, name_of(c), m) for c, m in _whole_row_cases()]
    empty = draw(n=0, v=1001, accept=lambda c: True)
    table += [_entry("empty_batch", whole_rows, empty, name_of(empty), m) for m in (False, True)]
    table += [_entry("tiles", tiles, t, _tiles_name(t), m) for t, m in _tile_cases()]
    table += [_entry("tied_maxima", tied_maxima, t, _tiles_name(t), True) for t in _tie_cases()]
    # A warp and a block per row, each with and without the policy metrics (a -inf logit
    # makes the row's logit_mean -inf and adds nothing to its entropy).
    table += [_entry("neg_inf", neg_inf_logits, c, name_of(c), m)
              for c in (draw(v=1500, n=2, t=4), draw(v=9000, n=2, t=4)) for m in (False, True)]
    table += [_entry("first_bad_label", first_bad_label, c, name_of(c), m)
              for c, m in ((draw(v=100, n=3), True), (draw(v=3000, n=3), False))]
    table += [KernelCase(f"preference_loss-{p.variant}-B{len(p.values[0])}", preference_loss, p)
              for p in _pair_cases()]
    return table


CASES = _table()
