"""Runs every CUDA kernel of tdpo_ext on small inputs that reach each of its code paths,
for compute-sanitizer (scripts/gpu/gpu_check.sh runs it under memcheck and racecheck), and
compares each result with the CPU op on the same inputs.

token_stats forward and backward: a warp per row (V <= 2048) and a block per row,
16-byte aligned rows, rows whose start is misaligned (a scalar head before the vectors),
rows of policy and reference that no common offset aligns (whole-row scalar path), V
smaller than one vector, -inf logits, masked rows, rows whose KL gradient is zero (the
reference is not read), float32, bfloat16, float16 and mixed pairs; an out-of-range label
must raise a RuntimeError, not a device-side assert, and leave the device usable.
token_stats_tile, token_stats_finish and token_stats_backward over tiles of vocabulary
columns (vocab_start > 0, tile starts not 16-byte aligned).
preference_loss forward and backward: every variant, several blocks of pairs.

Inputs are made on the CPU and copied over, so that the sanitizers see few kernels
besides tdpo_ext's. Exit status: 0 when every check passed, 1 otherwise.

    python scripts/gpu/sanitizer_case.py

With --emulated LIBRARY, the same cases run the kernels on the CPU through the CUDA
emulation (csrc/cuda/emulation/; LIBRARY is CMake's libtdpo_cuda_emulated.so), as
tests/test_cuda_emulation.py does under AddressSanitizer and ThreadSanitizer:

    python scripts/gpu/sanitizer_case.py --emulated build/.../libtdpo_cuda_emulated.so
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # an in-place build of tdpo_ext
import tdpo_ext  # noqa: E402

IGNORE = -100
FAILURES: list[str] = []
# The kernels under test: the CUDA ops on "cuda", or (--emulated) the emulated ones on the
# CPU. The CPU ops (torch.ops.tdpo_ext on CPU tensors) are the reference.
KERNELS = torch.ops.tdpo_ext
DEVICE = "cuda"
REFERENCE = torch.ops.tdpo_ext
ONLY = ""  # --only: run the cases whose name contains this

# (rtol, atol) for gradients compared in float32: one rounding to the logits dtype may
# differ by an ulp between devices.
GRAD_TOL = {torch.float32: (1e-4, 1e-7), torch.bfloat16: (1.6e-2, 1e-7),
            torch.float16: (2e-3, 1e-7)}
STATS_TOL = (1e-4, 1e-4)  # float32 outputs of sums over V in different orders


def check(name: str, fn) -> None:
    if ONLY not in name:
        return
    try:
        fn()
        print(f"ok    {name}", flush=True)
    except Exception:  # noqa: BLE001  (every failure is reported, then the next case runs)
        FAILURES.append(name)
        print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)


def make_logits(n: int, t: int, v: int, dtype: torch.dtype, layout: str, gen) -> torch.Tensor:
    """(n, t, v) logits on DEVICE with the given memory layout:
    contiguous   dense rows, 16-byte aligned when v * itemsize is a multiple of 16;
    shifted      logits[:, :-1] of an (n, t + 1, v) tensor, as a causal LM's output;
    offset       [..., 1:] of an (n, t, v + 1) tensor: every row starts one element late;
    transposed   an (t, n, v) tensor seen as (n, t, v): strides of dims 0 and 1 swapped;
    vocab_strided  a non-unit vocabulary stride (the op copies it once)."""
    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 3).to(dtype).to(DEVICE)
    if layout == "contiguous":
        return rand(n, t, v)
    if layout == "shifted":
        return rand(n, t + 1, v)[:, :-1]
    if layout == "offset":
        return rand(n, t, v + 1)[..., 1:]
    if layout == "transposed":
        return rand(t, n, v).transpose(0, 1)
    if layout == "vocab_strided":
        return rand(n, t, v, 2)[..., 0]
    raise ValueError(layout)


def make_targets(n: int, t: int, v: int, gen) -> torch.Tensor:
    targets = torch.randint(0, v, (n, t), generator=gen)
    targets[torch.rand(n, t, generator=gen) < 0.2] = IGNORE
    targets[0, -1] = IGNORE
    if n > 1:
        targets[1] = IGNORE  # a fully masked sequence
    return targets.to(DEVICE)


def compare_token_stats(pol: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor,
                        gen) -> None:
    got = KERNELS.token_stats(pol, ref, targets, IGNORE)
    want = REFERENCE.token_stats(pol.cpu(), ref.cpu(), targets.cpu(), IGNORE)
    for name, g, w in zip(("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref"), got,
                          want):
        torch.testing.assert_close(g.cpu(), w, rtol=STATS_TOL[0], atol=STATS_TOL[1],
                                   msg=lambda m, name=name: f"{name}: {m}")
    lse_pol, lse_ref = got[3], got[4]
    grad_logp = torch.randn(targets.shape, generator=gen)
    grad_kl = torch.randn(targets.shape, generator=gen)
    grad_kl[:, ::2] = 0.0  # coef_ref == 0: these rows must not read the reference
    grad = KERNELS.token_stats_backward(grad_logp.to(DEVICE), grad_kl.to(DEVICE), pol, ref,
                                        targets, lse_pol, lse_ref, IGNORE)
    grad_want = REFERENCE.token_stats_backward(grad_logp, grad_kl, pol.cpu(), ref.cpu(),
                                               targets.cpu(), lse_pol.cpu(), lse_ref.cpu(),
                                               IGNORE)
    assert grad.is_contiguous() and grad.dtype == pol.dtype, (grad.stride(), grad.dtype)
    rtol, atol = GRAD_TOL[pol.dtype]
    torch.testing.assert_close(grad.cpu().float(), grad_want.float(), rtol=rtol, atol=atol)
    masked = (targets == IGNORE).cpu()
    assert bool((grad.cpu()[masked] == 0).all()), "masked rows must have zero gradient"


def compare_tiles(pol: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor,
                  edges: list[int], gen) -> None:
    """token_stats_tile + token_stats_finish and token_stats_backward with vocab_start
    over the tiles [edges[k], edges[k + 1]) (views into the rows, unaligned where an edge
    is odd), on CUDA against the CPU ops."""
    tiles = list(zip(edges, edges[1:]))
    stats = {}
    for name, ops, device in (("kernels", KERNELS, DEVICE), ("cpu", REFERENCE, "cpu")):
        p, r, y = pol.to(device), ref.to(device), targets.to(device)
        state = None
        for v0, v1 in tiles:
            state = ops.token_stats_tile(p[..., v0:v1], r[..., v0:v1], y, IGNORE, v0, state)
        stats[name] = ops.token_stats_finish(state, y, IGNORE)
    for name, g, w in zip(("logp_pol", "logp_ref", "token_kl", "lse_pol", "lse_ref"),
                          stats["kernels"], stats["cpu"]):
        torch.testing.assert_close(g.cpu(), w, rtol=STATS_TOL[0], atol=STATS_TOL[1],
                                   msg=lambda m, name=name: f"tiled {name}: {m}")
    grad_logp = torch.randn(targets.shape, generator=gen)
    grad_kl = torch.randn(targets.shape, generator=gen)
    grad_kl[:, ::2] = 0.0
    lse_pol, lse_ref = stats["cpu"][3], stats["cpu"][4]
    rtol, atol = GRAD_TOL[pol.dtype]
    for v0, v1 in tiles:
        grad = KERNELS.token_stats_backward(grad_logp.to(DEVICE), grad_kl.to(DEVICE),
                                            pol[..., v0:v1], ref[..., v0:v1], targets,
                                            lse_pol.to(DEVICE), lse_ref.to(DEVICE), IGNORE, v0)
        want = REFERENCE.token_stats_backward(grad_logp, grad_kl, pol.cpu()[..., v0:v1],
                                        ref.cpu()[..., v0:v1], targets.cpu(), lse_pol,
                                        lse_ref, IGNORE, v0)
        torch.testing.assert_close(grad.cpu().float(), want.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, v0=v0: f"tiled grad at {v0}: {m}")


def token_stats_cases(gen) -> None:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # V: below one vector, warp per row (aligned / odd), the warp-block boundary, block
    # per row (odd / aligned).
    for v in (7, 1000, 1001, 2048, 2049, 5003, 32768):
        for layout in ("contiguous", "shifted", "offset", "transposed"):
            for pol_dtype, ref_dtype in ((f32, f32), (bf16, bf16)):
                name = f"token_stats V={v} {layout} {pol_dtype}/{ref_dtype}".replace("torch.", "")
                check(name, lambda: compare_token_stats(
                    make_logits(3, 3, v, pol_dtype, layout, gen),
                    make_logits(3, 3, v, ref_dtype, layout, gen), make_targets(3, 3, v, gen),
                    gen))
    # Mixed dtypes; with "offset" the fp16 policy and fp32 reference rows differ in
    # alignment, so no common start exists (whole-row scalar path).
    for v in (1001, 5003):
        for pol_layout, ref_layout in (("contiguous", "contiguous"), ("offset", "contiguous"),
                                       ("shifted", "offset")):
            for pol_dtype, ref_dtype in ((f16, f32), (bf16, f32), (f32, bf16)):
                name = (f"token_stats V={v} {pol_layout}/{ref_layout} "
                        f"{pol_dtype}/{ref_dtype}").replace("torch.", "")
                check(name, lambda: compare_token_stats(
                    make_logits(2, 4, v, pol_dtype, pol_layout, gen),
                    make_logits(2, 4, v, ref_dtype, ref_layout, gen),
                    make_targets(2, 4, v, gen), gen))
    check("token_stats vocab_strided", lambda: compare_token_stats(
        make_logits(2, 3, 999, f32, "vocab_strided", gen),
        make_logits(2, 3, 999, bf16, "vocab_strided", gen), make_targets(2, 3, 999, gen), gen))
    # Tiles of vocabulary columns (the fused LM head's ops): a warp and a block per row,
    # odd edges (unaligned tile starts), a label in every tile.
    for v, edges in ((1000, [0, 333, 1000]), (5003, [0, 1, 2049, 4097, 5003])):
        for pol_dtype, ref_dtype in ((f32, f32), (bf16, f32)):
            name = f"token_stats_tile V={v} {pol_dtype}/{ref_dtype}".replace("torch.", "")
            check(name, lambda: compare_tiles(
                make_logits(3, 3, v, pol_dtype, "contiguous", gen),
                make_logits(3, 3, v, ref_dtype, "contiguous", gen),
                make_targets(3, 3, v, gen), edges, gen))
    check("token_stats -inf logits", lambda: neg_inf_case(gen))
    check("token_stats empty batch", empty_case)
    check("token_stats bad label raises", bad_label_case)


def neg_inf_case(gen) -> None:
    """-inf logits: a whole vector chunk, threads whose every element is -inf, and scattered
    entries, both models -inf at once (finite KL), for both team sizes."""
    for v in (1500, 9000):
        pol = torch.randn(2, 4, v, generator=gen) * 3
        ref = torch.randn(2, 4, v, generator=gen) * 3
        pol[0, 0, : v // 2] = ref[0, 0, : v // 2] = float("-inf")
        pol[0, 1, 1::3] = ref[0, 1, 1::3] = float("-inf")
        targets = make_targets(2, 4, v, gen)
        targets[0, 0] = v - 1  # a finite label in the half -inf row
        targets[0, 1] = 0
        compare_token_stats(pol.to(DEVICE), ref.to(DEVICE), targets, gen)


def empty_case() -> None:
    pol = torch.zeros(0, 4, 64, device=DEVICE)
    targets = torch.zeros(0, 4, dtype=torch.long, device=DEVICE)
    outs = KERNELS.token_stats(pol, pol, targets, IGNORE)
    assert all(o.shape == (0, 4) for o in outs)
    grad = KERNELS.token_stats_backward(outs[0], outs[2], pol, pol, targets,
                                                   outs[3], outs[4], IGNORE)
    assert grad.shape == pol.shape
    state = KERNELS.token_stats_tile(pol, pol, targets, IGNORE, 0, None)
    assert state.shape == (0, 4, 7)
    assert all(o.shape == (0, 4)
               for o in KERNELS.token_stats_finish(state, targets, IGNORE))


def bad_label_case() -> None:
    for v in (100, 3000):  # a warp and a block per row
        pol = torch.randn(2, 3, v).to(DEVICE)
        for bad in (v, -5):
            targets = torch.full((2, 3), 7, dtype=torch.long)
            targets[1, 2] = bad
            targets[1, 1] = IGNORE
            try:
                KERNELS.token_stats(pol, pol, targets.to(DEVICE), IGNORE)
            except RuntimeError as e:
                expected = f"labels holds {bad} at row 1 (predicted by logits position 2)"
                assert expected in str(e) and f"outside the vocabulary [0, {v})" in str(e), str(e)
            else:
                raise AssertionError(f"label {bad} with V={v} did not raise")
        # The device is still usable: no sticky error as a device-side assert would leave.
        synchronize()
        good = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
        out = KERNELS.token_stats(pol, pol, good, IGNORE)
        assert bool(torch.isfinite(out[0]).all().cpu())


def preference_loss_cases(gen) -> None:
    for pairs in (1, 1000):
        inputs = [torch.randn(pairs, generator=gen) * 4 for _ in range(4)]
        grad_losses = torch.randn(pairs, generator=gen)
        for variant in ("tdpo1", "tdpo2", "dpo"):
            def case(variant=variant, inputs=inputs, grad_losses=grad_losses):
                got = KERNELS.preference_loss(*[x.to(DEVICE) for x in inputs], 0.1, 0.5,
                                              variant)
                want = REFERENCE.preference_loss(*inputs, 0.1, 0.5, variant)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
                got = KERNELS.preference_loss_backward(grad_losses.to(DEVICE),
                                                       *[x.to(DEVICE) for x in inputs], 0.1,
                                                       0.5, variant)
                want = REFERENCE.preference_loss_backward(grad_losses, *inputs, 0.1, 0.5,
                                                          variant)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
            check(f"preference_loss B={pairs} {variant}", case)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    global KERNELS, DEVICE, ONLY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", metavar="LIBRARY",
                        help="run the emulated kernels of this libtdpo_cuda_emulated.so")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="run only the cases whose name contains TEXT")
    args = parser.parse_args()
    ONLY = args.only
    if args.emulated:
        torch.ops.load_library(args.emulated)
        KERNELS, DEVICE = torch.ops.tdpo_ext_emulated, "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    elif not tdpo_ext.built_with_cuda():
        print("tdpo_ext was built without CUDA kernels", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    token_stats_cases(gen)
    preference_loss_cases(gen)
    synchronize()
    print(f"{len(FAILURES)} failed" + (": " + ", ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
