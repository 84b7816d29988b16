"""One tdpo_loss forward + backward at a shape of bench/bench_ops.py, with its inputs and
hyperparameters, for Nsight Compute (scripts/gpu/profile_ncu.sh runs it under ncu).

Warm-up calls, one timed call (its time and the bandwidth bench_ops.py would report),
then the profiled call inside the NVTX range "profiled", which ncu's --nvtx-include
selects, so that warm-up and timing kernels are not profiled. --kernel-table adds
torch.profiler's table of every CUDA kernel of one call: where the time goes besides
tdpo_ext's kernels (the label check's synchronization, gradient allocation, reductions).

    python scripts/gpu/profile_case.py 8x2048x32000:float32 [--kernel-table]

Exit status: 0, or 2 without a GPU or a CUDA build.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_ops  # noqa: E402  (the benchmark's shapes, inputs and measured step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", help="NxTxV:dtype, e.g. 8x2048x32000:float32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--kernel-table", action="store_true")
    args = ap.parse_args()
    case = bench_ops.Case.parse(args.case)
    if not (torch.cuda.is_available() and bench_ops.tdpo_ext.built_with_cuda()):
        print("profile_case: needs a GPU and tdpo_ext built with CUDA", file=sys.stderr)
        return 2

    inputs = bench_ops.make_inputs(case, "cuda", seed=0)
    loss = bench_ops.loss_fn("ours")

    def step():
        bench_ops.fwd_bwd(loss, inputs)

    for _ in range(args.warmup):
        step()
    seconds = bench_ops.make_timer("cuda")(step)
    moved = bench_ops.bytes_moved(case, inputs)
    print(f"{case}: {seconds * 1e3:.2f} ms, {moved / 1e9:.2f} GB moved, "
          f"{moved / seconds / 1e9:.0f} GB/s", flush=True)

    torch.cuda.synchronize()
    with torch.cuda.nvtx.range("profiled"):
        step()
        torch.cuda.synchronize()

    if args.kernel_table:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
