"""The one table of CUDA kernel cases, run by tests/test_cuda_matches_cpu.py (on a GPU and
emulated), by the sanitizer runs of tests/test_cuda_emulation.py and by scripts/gpu/
(sanitizer_case.py, under compute-sanitizer in gpu_check.sh).

Each entry pins the input class it exists for (dtypes, a vocabulary that a warp or a
block of threads owns, layouts of logits and labels, the ignore index) and draws every
other field from the generators of the CPU property tests (tests/inputs.py), from a seed
made of its pins: adding an entry changes no other. Sampled, not multiplied: every class
appears, not every combination (test_cuda_matches_cpu.py checks that each does).

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
                           preference_loss, tiles, whole_rows)

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
    check: Callable  # kernel_checks' function: check(inputs, kernels)
    inputs: object   # a Case, TileCase or PairCase


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


def _whole_row_cases() -> list[Case]:
    """Every dtype pair, each with a warp and a block per row; the ignore indices, label
    layouts and logits layouts cycled through across them."""
    out = []
    for k, ((policy_dtype, ref_dtype), vocabs) in enumerate(
            itertools.product(DTYPE_PAIRS, (WARP_VOCABS, BLOCK_VOCABS))):
        v = vocabs[k // 2 % len(vocabs)]
        out.append(draw(policy_dtype=policy_dtype, ref_dtype=ref_dtype, v=v,
                        ignore_index=ignore_indices(v)[k % 3],
                        labels_layout=LABEL_LAYOUTS[k // 3 % len(LABEL_LAYOUTS)],
                        policy_layout=LAYOUTS[k % len(LAYOUTS)],
                        ref_layout=LAYOUTS[(k + 1 + k // len(LAYOUTS)) % len(LAYOUTS)]))
    return out


def _tile_cases() -> list[TileCase]:
    """Tiles with vocab_start != 0 (at least two), forward and backward, on a warp and a
    block per row; the ignore index inside a later tile on one."""
    out = []
    for v, (policy_dtype, ref_dtype), ignore_index in ((1001, DTYPE_PAIRS[1], 1001 // 2),
                                                       (5003, DTYPE_PAIRS[5], 0)):
        pinned = dict(v=v, policy_dtype=policy_dtype, ref_dtype=ref_dtype,
                      ignore_index=ignore_index, mask_rate=0.3)
        case = draw(**pinned)
        out.append(TileCase(case, tuple(draw_tile_edges(_seeded(pinned), v, min_inner=2))))
    empty = draw(n=0, v=4100, accept=lambda c: True)
    return out + [TileCase(empty, (0, 2049, 4100))]


def _pair_cases() -> list[PairCase]:
    """Each variant; 1 pair, 300 (a second block of 256 threads, partly filled), 1000."""
    out = []
    for variant, pairs in zip(oracle.VARIANTS, (300, 1000, 1)):
        draws = _seeded(dict(variant=variant, pairs=pairs))
        values = draw_pair_values(draws, pairs)
        out.append(PairCase(tuple(map(tuple, values)), draws.choice(PAIR_BETAS),
                            draws.choice(PAIR_ALPHAS), variant, seed=pairs))
    return out


def _table() -> list[KernelCase]:
    table = [KernelCase(f"whole_rows-{name_of(c)}", whole_rows, c) for c in _whole_row_cases()]
    table += [KernelCase(f"empty_batch-{name_of(c)}", whole_rows, c)
              for c in [draw(n=0, v=1001, accept=lambda c: True)]]
    table += [KernelCase(f"tiles-{name_of(t.case)}-edges{'_'.join(map(str, t.edges))}", tiles, t)
              for t in _tile_cases()]
    # A warp and a block per row.
    table += [KernelCase(f"neg_inf-{name_of(c)}", neg_inf_logits, c)
              for c in (draw(v=1500, n=2, t=4), draw(v=9000, n=2, t=4))]
    table += [KernelCase(f"first_bad_label-{name_of(c)}", first_bad_label, c)
              for c in (draw(v=100, n=3), draw(v=3000, n=3))]
    table += [KernelCase(f"preference_loss-{p.variant}-B{len(p.values[0])}", preference_loss, p)
              for p in _pair_cases()]
    return table


CASES = _table()
