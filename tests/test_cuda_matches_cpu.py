"""The CUDA kernels against the CPU kernels on the same inputs, on a CUDA device where
there is one and on every machine through the CUDA emulation (tests/cuda_kernels.py). (On
a GPU each is also checked against the oracle through the device fixture; this compares
them directly, lse included, which the public functions do not expose.)"""
import itertools
import re

import pytest
import torch

import cuda_kernels
import oracle
import tdpo_ext
from compare import assert_within
import error_bounds
from error_bounds import EPS32, policy_grad_scale
from inputs import DTYPES, Case, build

# Each device is within error_bounds' tolerances of the oracle (test_sequence_stats.py),
# so the two are within twice those of each other.
RTOL = 2 * error_bounds.RTOL
ULPS = 2 * error_bounds.ULPS
GRAD_RTOL = {dtype: 2 * rtol for dtype, rtol in error_bounds.GRAD_RTOL.items()}
GRAD_ATOL = {dtype: 2 * atol for dtype, atol in error_bounds.GRAD_ATOL.items()}



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


CASES = [
    Case(n=4, t=6, v=1000, policy_dtype=torch.float32, ref_dtype=torch.float32, seed=1),
    Case(n=2, t=3, v=65536 + 13, policy_dtype=torch.bfloat16, ref_dtype=torch.float32,
         scale=60.0, seed=2),
    Case(n=4, t=5, v=17, policy_dtype=torch.float16, ref_dtype=torch.bfloat16,
         policy_layout="slice_t", ref_layout="vocab_strided", masked_rows=(2,), seed=3),
    Case(n=2, t=4, v=4100, policy_dtype=torch.float32, ref_dtype=torch.float16,
         offset=1e4, scale=30.0, ref_relation="close", seed=4),
    Case(n=2, t=1, v=3, policy_dtype=torch.float32, ref_dtype=torch.float32, seed=5),
]
# Every (policy, reference) dtype pair, each with a warp per row (V <= 2048) and a block
# per row: odd V in layouts whose rows start at different 16-byte alignments (the rows of
# a slice_t view shift by V elements, a slice_v row by V + 3; policy and reference
# aligned differently), a masked row, and 4 x 3 rows (a ragged last block of 8 rows).
LAYOUT_PAIRS = [("slice_t", "contiguous"), ("contiguous", "slice_v"), ("slice_v", "slice_t")]
CASES += [
    Case(n=4, t=3, v=v, policy_dtype=p, ref_dtype=r, policy_layout=layouts[0],
         ref_layout=layouts[1], masked_rows=(1,), seed=10 + i)
    for i, ((p, r), v) in enumerate(itertools.product(itertools.product(DTYPES, DTYPES),
                                                      (1001, 2053)))
    for layouts in [LAYOUT_PAIRS[i % len(LAYOUT_PAIRS)]]
]


def case_id(c: Case) -> str:
    dtypes = f"{c.policy_dtype}/{c.ref_dtype}".replace("torch.", "")
    return f"{c.n}x{c.t}x{c.v}-{dtypes}-{c.policy_layout}/{c.ref_layout}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_token_stats_and_backward(case, kernels):
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    cpu = torch.ops.tdpo_ext.token_stats(policy, ref, targets, case.ignore_index)
    policy_k, ref_k = build(case, kernels.device, policy_requires_grad=False)[:2]
    targets_k = targets.to(kernels.device)
    gpu = kernels.ops.token_stats(policy_k, ref_k, targets_k, case.ignore_index)
    tokens = oracle.token_terms(policy, ref, labels, case.ignore_index)
    magnitude = torch.nn.functional.pad(tokens.magnitude, (0, 1))  # position T-1: 0
    for name, c, g in zip(("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref"), cpu, gpu):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=name)

    grad_logp, grad_kl = torch.randn((2, *targets.shape),
                                     generator=torch.Generator().manual_seed(case.seed))
    grad_cpu = torch.ops.tdpo_ext.token_stats_backward(
        grad_logp, grad_kl, policy, ref, targets, cpu[3], cpu[4], case.ignore_index)
    grad_gpu = kernels.ops.token_stats_backward(
        grad_logp.to(kernels.device), grad_kl.to(kernels.device), policy_k, ref_k, targets_k,
        gpu[3], gpu[4], case.ignore_index)
    assert grad_gpu.dtype == grad_cpu.dtype == case.policy_dtype
    scale = policy_grad_scale(tokens, grad_logp[:, :-1].double(), grad_kl[:, :-1].double(),
                              coef_error=1.0)
    assert_within(grad_gpu, grad_cpu, rtol=GRAD_RTOL[case.policy_dtype],
                  atol=ULPS * EPS32 * scale + GRAD_ATOL[case.policy_dtype],
                  name="grad policy_logits")


@pytest.mark.parametrize("variant", oracle.VARIANTS)
def test_preference_loss_and_backward(variant, kernels):
    gen = torch.Generator().manual_seed(0)
    # 300 pairs: a second block of 256 threads, partly filled.
    pair = [torch.randn(300, generator=gen) * 10 for _ in range(4)]
    grad_losses = torch.randn(300, generator=gen)
    args = (0.1, 0.5, variant)
    magnitude = sum(t.abs() for t in pair)
    for name, c, g in zip(
            ("losses", "chosen_rewards", "rejected_rewards"),
            torch.ops.tdpo_ext.preference_loss(*pair, *args),
            kernels.ops.preference_loss(*(t.to(kernels.device) for t in pair), *args)):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=name)
    for i, (c, g) in enumerate(zip(
            torch.ops.tdpo_ext.preference_loss_backward(grad_losses, *pair, *args),
            kernels.ops.preference_loss_backward(grad_losses.to(kernels.device),
                                                 *(t.to(kernels.device) for t in pair),
                                                 *args))):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude * grad_losses.abs(),
                      name=f"grad {i}")


# Tiles of vocabulary columns (the fused LM head's ops): a warp and a block per row, tile
# starts that are odd (unaligned rows); the labels are set so that each tile holds some.
TILE_CASES = [
    (Case(n=3, t=3, v=1000, policy_dtype=torch.bfloat16, ref_dtype=torch.float32,
          mask_rate=0.0, masked_rows=(2,), seed=40), [0, 333, 1000]),
    (Case(n=3, t=3, v=5003, policy_dtype=torch.float32, ref_dtype=torch.float16,
          mask_rate=0.0, seed=41), [0, 1, 2049, 4097, 5003]),
]


@pytest.mark.parametrize("case,edges", TILE_CASES, ids=lambda x: getattr(x, "v", None))
def test_token_stats_tiles_and_backward(case, edges, kernels):
    """token_stats_tile over the tiles [edges[k], edges[k + 1]), then token_stats_finish,
    and token_stats_backward per tile with vocab_start = edges[k]."""
    policy, ref, labels = build(case, "cpu", policy_requires_grad=False)
    unmasked = labels[:, 1:] != case.ignore_index
    assert int(unmasked.sum()) >= len(edges) - 1
    # The k-th unmasked label: column edges[k] + k of the tile k % tiles.
    k = torch.arange(int(unmasked.sum()))
    starts = torch.tensor(edges[:-1])
    labels[:, 1:][unmasked] = starts[k % len(starts)] + k // len(starts)
    targets = tdpo_ext.shift_labels(labels, case.ignore_index)
    tiles = list(zip(edges, edges[1:]))
    stats = {}
    for name, ops, device in (("cpu", torch.ops.tdpo_ext, "cpu"),
                              ("kernels", kernels.ops, kernels.device)):
        p, r, y = policy.to(device), ref.to(device), targets.to(device)
        state = None
        for v0, v1 in tiles:
            state = ops.token_stats_tile(p[..., v0:v1], r[..., v0:v1], y, case.ignore_index,
                                         v0, state)
        stats[name] = ops.token_stats_finish(state, y, case.ignore_index)
    tokens = oracle.token_terms(policy, ref, labels, case.ignore_index)
    magnitude = torch.nn.functional.pad(tokens.magnitude, (0, 1))
    for name, c, g in zip(("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref"),
                          stats["cpu"], stats["kernels"]):
        assert_within(g, c, rtol=RTOL, atol=ULPS * EPS32 * magnitude, name=f"tiled {name}")

    grad_logp, grad_kl = torch.randn((2, *targets.shape),
                                     generator=torch.Generator().manual_seed(case.seed))
    lse_pol, lse_ref = stats["cpu"][3], stats["cpu"][4]
    scale = policy_grad_scale(tokens, grad_logp[:, :-1].double(), grad_kl[:, :-1].double(),
                              coef_error=1.0)
    d = kernels.device
    for v0, v1 in tiles:
        want = torch.ops.tdpo_ext.token_stats_backward(
            grad_logp, grad_kl, policy[..., v0:v1], ref[..., v0:v1], targets, lse_pol, lse_ref,
            case.ignore_index, v0)
        got = kernels.ops.token_stats_backward(
            grad_logp.to(d), grad_kl.to(d), policy.to(d)[..., v0:v1], ref.to(d)[..., v0:v1],
            targets.to(d), lse_pol.to(d), lse_ref.to(d), case.ignore_index, v0)
        assert_within(got, want, rtol=GRAD_RTOL[case.policy_dtype],
                      atol=ULPS * EPS32 * scale[..., v0:v1] + GRAD_ATOL[case.policy_dtype],
                      name=f"grad of the tile at {v0}")


@pytest.mark.parametrize("v", [100, 3000], ids=["warp-per-row", "block-per-row"])
def test_first_bad_label_is_named(v, kernels):
    """Several bad labels, in rows handled by different teams and blocks: the error names
    the first one (smallest row, then position), which the kernels find by atomicMin."""
    targets = torch.full((3, 4), 7, dtype=torch.long)
    targets[2, 0] = v + 4
    targets[1, 3] = -5
    targets[1, 2] = -100  # ignore_index: not bad
    targets[1, 1] = v
    logits = torch.randn(3, 4, v).to(kernels.device)
    with pytest.raises(RuntimeError, match=re.escape(
            f"labels holds {v} at row 1 (predicted by logits position 1)")):
        kernels.ops.token_stats(logits, logits, targets.to(kernels.device), -100)
