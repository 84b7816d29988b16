"""What the policy metrics (token_stats' policy_metrics: entropy, logit_mean,
label_is_argmax) cost on the GPU: each measured step timed with them on and off, on the
same inputs in one process, interleaved rep by rep, compared by the medians. Issue 32's
target: at most 5% more with them on (and the kernels without them unchanged, which
bench/bench_ops.py --baseline measures against main).

    python scripts/gpu/metrics_overhead.py --out OUTDIR/metrics_cuda.md [--reps 20] [SHAPE ...]

Steps, at each shape of bench/bench_ops.py (its inputs: close models, masked prompts):
  forward   torch.ops.tdpo_ext.token_stats: the kernel the metrics are added to, so the
            largest share they can take
  tiled     token_stats_tile over 4 tiles of the vocabulary, then token_stats_finish
  loss      tdpo_ext.tdpo_loss forward + backward, the user's step (the backward is the
            same with or without the metrics)
gpu_check.sh runs it. Exit status: 0 (it reports, it does not judge), 2 without a GPU or a
CUDA build.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_ops  # noqa: E402  (the benchmark's shapes, inputs, timer and hyperparameters)

tdpo_ext = bench_ops.tdpo_ext
DEFAULT_SHAPES = "8x2048x128256:bfloat16,8x2048x32000:float32"
TILES = 4
TARGET = 1.05  # time with the metrics / time without


def steps(inputs):
    """name -> step(policy_metrics) on inputs."""
    policy, ref, labels = inputs
    targets = tdpo_ext.shift_labels(labels, bench_ops.IGNORE_INDEX)  # as tdpo_loss passes them
    logits = (policy.detach(), ref)
    v = policy.shape[-1]
    edges = [v * k // TILES for k in range(TILES + 1)]
    ignore = bench_ops.IGNORE_INDEX

    def forward(metrics):
        torch.ops.tdpo_ext.token_stats(*logits, targets, ignore, metrics)

    def tiled(metrics):
        state = None
        for v0, v1 in zip(edges, edges[1:]):
            state = torch.ops.tdpo_ext.token_stats_tile(
                logits[0][..., v0:v1], logits[1][..., v0:v1], targets, ignore, v0, state,
                metrics)
        torch.ops.tdpo_ext.token_stats_finish(state, targets, ignore)

    def loss(metrics):
        policy.grad = None
        tdpo_ext.tdpo_loss(policy, ref, labels, policy_metrics=metrics,
                           **bench_ops.HYPER).loss.backward()

    return {"forward": forward, "tiled": tiled, "loss": loss}


def time_case(case: bench_ops.Case, reps: int) -> dict[str, tuple[float, float]]:
    """step -> (median seconds without the metrics, with them)."""
    inputs = bench_ops.make_inputs(case, "cuda", seed=0)
    timer = bench_ops.make_timer("cuda")
    out = {}
    for name, step in steps(inputs).items():
        for metrics in (False, True):
            for _ in range(bench_ops.WARMUP_CALLS["cuda"]):
                step(metrics)
        times = {False: [], True: []}
        for _ in range(reps):
            for metrics in (False, True):
                times[metrics].append(timer(lambda: step(metrics)))
        out[name] = (statistics.median(times[False]), statistics.median(times[True]))
    return out


def render(results: dict, reps: int) -> str:
    lines = [f"## Policy metrics on against off ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, median of {reps} interleaved reps; target <= "
             f"{TARGET:.2f}x)", "",
             "| shape | step | off (ms) | on (ms) | on / off | within target |",
             "|---|---|---|---|---|---|"]
    for shape, by_step in results.items():
        for step, (off, on) in by_step.items():
            lines.append(f"| {shape} | {step} | {off * 1e3:.3f} | {on * 1e3:.3f} | "
                         f"{on / off:.3f} | {'yes' if on / off <= TARGET else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", nargs="*", help=f"NxTxV:dtype (default {DEFAULT_SHAPES})")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, help="write the table here too (markdown)")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and tdpo_ext.built_with_cuda()):
        print("metrics_overhead: needs a GPU and tdpo_ext built with CUDA", file=sys.stderr)
        return 2
    results = {}
    for text in args.shapes or DEFAULT_SHAPES.split(","):
        results[text] = time_case(bench_ops.Case.parse(text), args.reps)
        torch.cuda.empty_cache()
        table = render(results, args.reps)  # after every shape: a timeout keeps the finished
        if args.out:
            args.out.write_text(table)
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
