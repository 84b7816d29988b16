"""Logits batches and preference pairs for the tests: the generators that draw their
description (Case, pair values) and the builder that turns a Case into tensors, in any
dtype and memory layout.

Each generator is a plain function of `draws`, anything with random.Random's choice,
randint and uniform: the CPU property tests pass hypothesis' draws (tests/strategies.py),
the table of kernel cases (tests/kernel_cases.py) a random.Random with a fixed seed, so
that both draw from the same classes of input."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How a (N, T, V) logits tensor sits in memory. Every layout but "vocab_strided" has a
# unit vocabulary stride, which the kernels read in place; "vocab_strided" makes the
# op copy first.
LAYOUTS = (
    "contiguous",
    "slice_t",        # big[:, :-1] of (N, T + 1, V), as logits[:, :-1] of a model output
    "step_t",         # big[:, ::2] of (N, 2T, V)
    "slice_v",        # big[..., :V] of (N, T, V + 3): padded rows
    "offset",         # big[..., 1:] of (N, T, V + 1): every row starts one element late
    "transposed",     # a (T, N, V) tensor's .transpose(0, 1): batch and time strides swapped
    "expanded",       # (1, T, V).expand(N, T, V): batch stride 0
    "vocab_strided",  # (N, V, T).transpose(1, 2): vocabulary stride T
)

# Small vocabularies around the SIMD widths (8 and 16 float lanes), sizes around the
# kernels' 2048-element vocabulary chunk, and large ones (>= 65536) kept small in N * T.
SMALL_VOCABS = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 257, 1000, 2047, 2048, 2049, 4100)
LARGE_VOCABS = (65536, 70001)

# How the (N, T) labels sit in memory. The public functions shift them into contiguous
# targets; the ops read the targets they get with their strides, so the kernel cases
# hand the targets over in these layouts (tests/kernel_checks.py).
LABEL_LAYOUTS = (
    "contiguous",
    "slice_t",     # big[:, 1:] of (N, T + 1): a row stride of T + 1
    "transposed",  # a (T, N) tensor's .t(): a row stride of 1, a position stride of N
)

# Half-width of the uniform logits around their offset: 60 spreads a row over ~120
# (the reference pattern's float32 softmax().log() underflows beyond ~104), 1e4 makes
# near-one-hot rows.
SCALES = (0.5, 4.0, 60.0, 1e4)
OFFSETS = (0.0, -30.0, 1e4, -1e4)

# Preference pairs: bounds of the margins and KLs (exact in float32), beta and alpha.
PAIR_SCALES = (2.0**-10, 1.0, 30.0, 1e4)
PAIR_BETAS = (0.01, 0.1, 0.5, 2.0)
PAIR_ALPHAS = (0.0, 0.5, 1.0, 3.0)


@dataclass(frozen=True)
class Case:
    n: int
    t: int
    v: int
    policy_dtype: torch.dtype
    ref_dtype: torch.dtype
    policy_layout: str = "contiguous"
    ref_layout: str = "contiguous"
    labels_layout: str = "contiguous"
    scale: float = 4.0
    offset: float = 0.0
    ref_relation: str = "independent"  # "close" (KL ~ 0: cancellation) or "same" values
    mask_rate: float = 0.3             # share of positions whose label is ignore_index
    masked_rows: tuple[int, ...] = ()  # rows with every label ignore_index
    ignore_index: int = -100
    seed: int = 0


def draw_case(draws, *, even_rows: bool = False, **pinned) -> Case:
    """Any Case, but for the fields given in pinned; with even_rows, N = 2B as tdpo_loss
    needs. The ignore index is -100, -1, or an id inside [0, V): 0 (a pad id) or any."""
    v = pinned.get("v", draws.choice(SMALL_VOCABS + LARGE_VOCABS))
    large = v >= LARGE_VOCABS[0]
    n = pinned.get("n", draws.randint(1, 2 if large else 4))
    if even_rows:
        n = 2 * max(1, n // 2)
    drawn = dict(
        n=n, v=v,
        t=draws.randint(1, 3 if large else 6),
        policy_dtype=draws.choice(DTYPES),
        ref_dtype=draws.choice(DTYPES),
        policy_layout=draws.choice(LAYOUTS),
        ref_layout=draws.choice(LAYOUTS),
        labels_layout=draws.choice(LABEL_LAYOUTS),
        scale=draws.choice(SCALES),
        offset=draws.choice(OFFSETS),
        ref_relation=draws.choice(("independent", "close", "same")),
        mask_rate=draws.choice((0.0, 0.3, 1.0)),
        masked_rows=tuple(sorted({draws.randint(0, n - 1) for _ in range(draws.randint(0, n))})),
        ignore_index=draws.choice((-100, -1, 0, draws.randint(0, v - 1))),
        seed=draws.randint(0, 2**31 - 1),
    )
    return Case(**{**drawn, **pinned})


def draw_tile_edges(draws, vocab: int, *, min_inner: int = 0) -> list[int]:
    """Edges 0 = e_0 < e_1 < ... < e_k = vocab of tiles of vocabulary columns: up to 4
    inner edges anywhere (tiles of one column, unaligned tile starts), at least min_inner
    where the vocabulary has room."""
    count = draws.randint(min(min_inner, vocab - 1), min(4, vocab - 1))
    return [0, *sorted({draws.randint(1, vocab - 1) for _ in range(count)}), vocab]


def draw_pair_values(draws, pairs: int | None = None) -> list[list[float]]:
    """Four lists of B (1 to 8 unless given) values: the chosen and rejected margins of B
    pairs (any sign), then their KLs (>= 0)."""
    b = draws.randint(1, 8) if pairs is None else pairs
    values = []
    for nonnegative in (False, False, True, True):
        bound = draws.choice(PAIR_SCALES)
        values.append([draws.uniform(0.0 if nonnegative else -bound, bound) for _ in range(b)])
    return values


def labels_in_layout(labels: torch.Tensor, layout: str, vocab: int) -> torch.Tensor:
    """A tensor equal to labels (N, T), laid out as named (LABEL_LAYOUTS); a view of a
    larger tensor holds vocab around the view: a kernel that reads outside it meets a
    label outside the vocabulary."""
    n, t = labels.shape
    if layout == "contiguous":
        return labels.clone(memory_format=torch.contiguous_format)
    if layout == "slice_t":
        big = labels.new_full((n, t + 1), vocab)
        big[:, 1:] = labels
        return big[:, 1:]
    if layout == "transposed":
        return labels.t().contiguous().t()
    raise ValueError(layout)


def _in_layout(values: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
    """A tensor equal to values (N, T, V), laid out as named: a view of a larger tensor
    (filled with NaN around the view, so that a kernel reading outside it shows). With
    requires_grad, that larger tensor is a leaf that requires grad, as a model's output
    would be in the graph."""
    n, t, v = values.shape

    def leaf(tensor):
        return tensor.detach().requires_grad_(requires_grad)

    def padded(shape, view):
        big = values.new_full(shape, float("nan"))
        view(big).copy_(values)
        return view(leaf(big))

    if layout == "contiguous":
        return leaf(values.clone())
    if layout == "slice_t":
        return padded((n, t + 1, v), lambda big: big[:, :-1])
    if layout == "step_t":
        return padded((n, 2 * t, v), lambda big: big[:, ::2])
    if layout == "slice_v":
        return padded((n, t, v + 3), lambda big: big[..., :v])
    if layout == "offset":
        return padded((n, t, v + 1), lambda big: big[..., 1:])
    if layout == "transposed":
        return padded((t, n, v), lambda big: big.transpose(0, 1))
    if layout == "expanded":
        return leaf(values[:1].clone()).expand(n, t, v)
    if layout == "vocab_strided":
        return leaf(values.transpose(1, 2).contiguous()).transpose(1, 2)
    raise ValueError(layout)


def build(case: Case, device: str, *, policy_requires_grad: bool = True):
    """(policy_logits, ref_logits, labels) on device, in the case's dtypes and layouts;
    policy_logits is in the autograd graph when policy_requires_grad. An "expanded"
    tensor repeats its row 0 in every row; the labels are in the case's labels_layout."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.n, case.t, case.v)

    def uniform():
        return case.offset + case.scale * (2 * torch.rand(shape, generator=gen,
                                                          dtype=torch.float64) - 1)

    policy = uniform()
    if case.policy_layout == "expanded":
        policy = policy[:1].expand(shape)
    if case.ref_relation == "same":
        ref = policy.clone()
    elif case.ref_relation == "close":
        ref = policy + 1e-3 * case.scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        ref = uniform()
    if case.ref_layout == "expanded":
        ref = ref[:1].expand(shape)

    labels = torch.randint(0, case.v, (case.n, case.t), generator=gen)
    masked = torch.rand((case.n, case.t), generator=gen) < case.mask_rate
    masked[list(case.masked_rows)] = True
    labels[masked] = case.ignore_index

    policy = _in_layout(policy.to(case.policy_dtype).to(device), case.policy_layout,
                        policy_requires_grad)
    ref = _in_layout(ref.to(case.ref_dtype).to(device), case.ref_layout, False)
    return policy, ref, labels_in_layout(labels.to(device), case.labels_layout, case.v)

