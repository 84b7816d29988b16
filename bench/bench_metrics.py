"""The cost of the policy metrics (issue 32): the token_stats forward and the fused-linear
forward with policy_metrics off and on, in this build, and in another build (main's,
which has no metrics) on the same inputs.

    python bench/bench_metrics.py --baseline /tmp/main-c8162be --out bench/RESULTS.md

One worker process per build imports its own tdpo_ext (the baseline's through
PYTHONPATH) and builds the same inputs from the same seed. The parent asks the workers
for one timed call at a time, rotating the order of the three (this build off, this
build on, baseline) every rep, so that a machine's load drifts over all three alike; the
table gives each one's median and the median (min-max) of the per-rep time ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (op, N, T, V, H): token_stats on materialized logits at a Llama-2-like and a SmolLM2
# vocabulary; the fused head at SmolLM2-135M's H and V.
DEFAULT_CASES = ("token_stats:4x512x32000", "token_stats:4x256x49152",
                 "fused:4x256x49152x576")
RUNS = ("off", "on", "baseline")


def make_inputs(spec: str, dtype: torch.dtype, seed: int = 0):
    """The op's arguments before the flag: logits (or hidden states and weights) with a
    policy close to the reference, and a quarter of each row masked as a prompt."""
    op, dims = spec.split(":")
    n, t, v, *h = (int(x) for x in dims.split("x"))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, : t // 4] = IGNORE_INDEX
    if op == "token_stats":
        ref = torch.randn(n, t, v, generator=gen).mul_(2.0)
        policy = torch.randn(n, t, v, generator=gen).mul_(0.1).add_(ref)
        return op, (policy.to(dtype), ref.to(dtype), labels, IGNORE_INDEX)
    hidden = torch.randn(n, t, h[0], generator=gen).to(dtype)
    weight = (torch.randn(v, h[0], generator=gen) / h[0] ** 0.5).to(dtype)
    ref_weight = weight + 0.01 * torch.randn(v, h[0], generator=gen).to(dtype) / h[0] ** 0.5
    return op, (hidden, weight, None, hidden, ref_weight, None, labels, IGNORE_INDEX, 0, 1.0,
                0.0)


def worker() -> None:
    """Answers {"case", "dtype", "metrics"} lines on stdin with the seconds of one call."""
    import tdpo_ext  # noqa: F401  (the build on PYTHONPATH; registers the ops)
    print(json.dumps({"tdpo_ext": tdpo_ext.__file__}), flush=True)
    inputs = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["case"], request["dtype"])
        if key not in inputs:
            inputs.clear()  # one case's inputs at a time
            inputs[key] = make_inputs(request["case"], DTYPES[request["dtype"]])
        op, args = inputs[key]
        fn = getattr(torch.ops.tdpo_ext,
                     "token_stats" if op == "token_stats" else "fused_linear_token_stats")
        # Off, the call is main's: the flag is not passed.
        args = (*args, True) if request["metrics"] else args
        with torch.no_grad():
            start = time.perf_counter()
            fn(*args)
            seconds = time.perf_counter() - start
        print(json.dumps(seconds), flush=True)


class Worker:
    def __init__(self, package_root: Path):
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.package = json.loads(self.proc.stdout.readline())["tdpo_ext"]

    def call(self, case: str, dtype: str, metrics: bool) -> float:
        self.proc.stdin.write(json.dumps(dict(case=case, dtype=dtype, metrics=metrics)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure(this: Worker, base: Worker, case: str, dtype: str, reps: int) -> dict:
    calls = {"off": lambda: this.call(case, dtype, False),
             "on": lambda: this.call(case, dtype, True),
             "baseline": lambda: base.call(case, dtype, False)}
    for run in RUNS:  # warm-up: allocations, thread pools, page faults of the inputs
        calls[run]()
    times = {run: [] for run in RUNS}
    for rep in range(reps):
        for run in RUNS[rep % 3:] + RUNS[:rep % 3]:
            times[run].append(calls[run]())
    return times


def ratio_cell(times: dict, a: str, b: str) -> str:
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f})"


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "unknown CPU")
    return f"{name}, {os.cpu_count()} cores, torch {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path,
                    help="directory holding another build's tdpo_ext package (main's)")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, help="append the markdown section to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    if not (args.baseline and (args.baseline / "tdpo_ext" / "__init__.py").is_file()):
        sys.exit(f"--baseline {args.baseline}: needs a directory holding a tdpo_ext package")

    this, base = Worker(ROOT), Worker(args.baseline.resolve())
    load = os.getloadavg()[0]
    lines = [
        f"## Policy metrics: forward time off / on / baseline build, cpu: {machine()}; "
        f"{datetime.date.today()}",
        "",
        f"`python bench/bench_metrics.py --baseline {args.baseline}`: this build "
        f"{this.package}, baseline {base.package}. {args.reps} calls of each after one "
        f"warm-up, the order of the three rotating every call; ratios: median (min–max) "
        f"of the per-call ratios. Load average at the start: {load:.1f}.",
        "",
        "| op | shape | dtype | off ms | on ms | baseline ms | on / off | off / baseline |"
        " on / baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in args.cases.split(","):
        for dtype in args.dtypes.split(","):
            times = measure(this, base, case, dtype, args.reps)
            op, shape = case.split(":")
            med = {run: statistics.median(times[run]) * 1e3 for run in RUNS}
            lines.append(f"| {op} | {shape.replace('x', '×')} | {dtype} | {med['off']:.1f} | "
                         f"{med['on']:.1f} | {med['baseline']:.1f} | "
                         f"{ratio_cell(times, 'on', 'off')} | "
                         f"{ratio_cell(times, 'off', 'baseline')} | "
                         f"{ratio_cell(times, 'on', 'baseline')} |")
            print(lines[-1], file=sys.stderr, flush=True)
    this.close()
    base.close()
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
