"""Logits batches for the tests: a hypothesis strategy drawing their description (Case)
and the builder that turns a Case into tensors, in any dtype and memory layout."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How a (N, T, V) logits tensor sits in memory. Every layout but "vocab_strided" has a
# unit vocabulary stride, which the kernels read in place; "vocab_strided" makes the
# op copy first.
LAYOUTS = (
    "contiguous",
    "slice_t",        # big[:, :-1] of (N, T + 1, V), as logits[:, :-1] of a model output
    "step_t",         # big[:, ::2] of (N, 2T, V)
    "slice_v",        # big[..., :V] of (N, T, V + 3): padded rows
    "expanded",       # (1, T, V).expand(N, T, V): batch stride 0
    "vocab_strided",  # (N, V, T).transpose(1, 2): vocabulary stride T
)

# Small vocabularies around the SIMD widths (8 and 16 float lanes), sizes around the
# kernels' 2048-element vocabulary chunk, and large ones (>= 65536) kept small in N * T.
SMALL_VOCABS = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 257, 1000, 2047, 2048, 2049, 4100)
LARGE_VOCABS = (65536, 70001)

# Half-width of the uniform logits around their offset: 60 spreads a row over ~120
# (the reference pattern's float32 softmax().log() underflows beyond ~104), 1e4 makes
# near-one-hot rows.
SCALES = (0.5, 4.0, 60.0, 1e4)
OFFSETS = (0.0, -30.0, 1e4, -1e4)


@dataclass(frozen=True)
class Case:
    n: int
    t: int
    v: int
    policy_dtype: torch.dtype
    ref_dtype: torch.dtype
    policy_layout: str = "contiguous"
    ref_layout: str = "contiguous"
    scale: float = 4.0
    offset: float = 0.0
    ref_relation: str = "independent"  # "close" (KL ~ 0: cancellation) or "same" values
    mask_rate: float = 0.3             # share of positions whose label is ignore_index
    masked_rows: tuple[int, ...] = ()  # rows with every label ignore_index
    ignore_index: int = -100
    seed: int = 0


@st.composite
def cases(draw, *, even_rows: bool = False) -> Case:
    """Any Case; with even_rows, N = 2B as tdpo_loss needs."""
    v = draw(st.sampled_from(SMALL_VOCABS + LARGE_VOCABS))
    large = v in LARGE_VOCABS
    n = draw(st.integers(1, 2 if large else 4))
    t = draw(st.integers(1, 3 if large else 6))
    if even_rows:
        n = 2 * max(1, n // 2)
    return Case(
        n=n, t=t, v=v,
        policy_dtype=draw(st.sampled_from(DTYPES)),
        ref_dtype=draw(st.sampled_from(DTYPES)),
        policy_layout=draw(st.sampled_from(LAYOUTS)),
        ref_layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from(SCALES)),
        offset=draw(st.sampled_from(OFFSETS)),
        ref_relation=draw(st.sampled_from(("independent", "close", "same"))),
        mask_rate=draw(st.sampled_from((0.0, 0.3, 1.0))),
        masked_rows=tuple(sorted(draw(st.sets(st.integers(0, n - 1), max_size=n)))),
        ignore_index=draw(st.sampled_from((-100, -1, 0))),  # 0: a pad id inside [0, V)
        seed=draw(st.integers(0, 2**31 - 1)),
    )


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
    if layout == "expanded":
        return leaf(values[:1].clone()).expand(n, t, v)
    if layout == "vocab_strided":
        return leaf(values.transpose(1, 2).contiguous()).transpose(1, 2)
    raise ValueError(layout)


def build(case: Case, device: str, *, policy_requires_grad: bool = True):
    """(policy_logits, ref_logits, labels) on device, in the case's dtypes and layouts;
    policy_logits is in the autograd graph when policy_requires_grad. An "expanded"
    tensor repeats its row 0 in every row."""
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
    return policy, ref, labels.to(device)

