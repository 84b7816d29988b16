"""One full TDPO training step of SmolLM2-135M (policy forward + backward, reference
forward, loss), --loss-impl fused beside reference, at a few batch shapes: time and peak
memory. The step is tdpo_ext.training.losses.batch_loss + backward, the training loop's own code
(the optimizer update is left out: it is the same for both).

    python bench/bench_train_step.py                      # appends to bench/RESULTS.md
    python bench/bench_train_step.py --shapes 1x64 --repeats 1 --out -   # quick look

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the step; on CPU, the peak
resident set size during the step (Linux VmHWM, reset through /proc/self/clear_refs)
minus the resident size before it, after returning freed memory to the OS (malloc_trim).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peak_memory import PeakMemory  # noqa: E402
from tdpo_ext.training import models as M  # noqa: E402
from tdpo_ext.training.config import Config  # noqa: E402
from tdpo_ext.training.losses import batch_loss  # noqa: E402


def make_batch(pairs, length, vocab, device, gen):
    rows = 2 * pairs
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, :length // 4] = -100  # a quarter of each row is prompt
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def step(policy, ref, batch, impl):
    cfg = Config(loss="tdpo2", loss_impl=impl, beta=0.1, alpha=0.5)
    loss, _ = batch_loss(policy, ref, batch, cfg, "train")
    loss.backward()
    policy.zero_grad(set_to_none=True)
    return float(loss.detach())


def loss_op_time(batch, vocab, impl, device):
    """The loss alone (forward + backward into the logits) on random logits of the step's
    shape: the part of the step that the two implementations differ in."""
    from tdpo_ext import tdpo_loss
    from tdpo_ext.reference import reference_tdpo_loss
    rows, length = batch["labels"].shape
    g = torch.Generator(device=device).manual_seed(1)
    pol = torch.randn(rows, length, vocab, generator=g, device=device).requires_grad_()
    ref = torch.randn(rows, length, vocab, generator=g, device=device)
    fn = tdpo_loss if impl == "fused" else reference_tdpo_loss
    t = time.perf_counter()
    fn(pol, ref, batch["labels"], beta=0.1, alpha=0.5, variant="tdpo2").loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def machine(device):
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host CPU: {cpu})"
    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x128,2x256,4x256",
                   help="PAIRSxTOKENS, comma separated (rows = 2 x pairs)")
    p.add_argument("--impls", default="fused,reference")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "RESULTS.md"),
                   help="markdown file the table is appended to; - for stdout only")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.time()
    policy, tok = M.load_model("smollm2", dtype=dtype, device=device)
    ref = M.frozen_copy(policy)
    policy.train()
    print(f"loaded SmolLM2-135M in {time.time() - t0:.0f} s", flush=True)
    vocab = policy.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        pairs, length = (int(x) for x in shape.split("x"))
        batch = make_batch(pairs, length, vocab, device, gen)
        impls = args.impls.split(",")
        times, peaks, losses, op_times = ({i: [] for i in impls} for _ in range(4))
        for impl in impls:
            for _ in range(args.warmup):
                step(policy, ref, batch, impl)
        for _ in range(args.repeats):  # interleaved, so that both see the same machine load
            for impl in impls:
                with PeakMemory(device) as mem:
                    t = time.perf_counter()
                    losses[impl] = step(policy, ref, batch, impl)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[impl].append(time.perf_counter() - t)
                peaks[impl].append(mem.peak)
                op_times[impl].append(loss_op_time(batch, vocab, impl, device))
        result = {i: (statistics.median(times[i]), max(peaks[i]), losses[i],
                      statistics.median(op_times[i])) for i in impls}
        for i in impls:
            print(f"{shape} {i}: step {result[i][0]:.2f} s (all: "
                  f"{', '.join(f'{x:.1f}' for x in times[i])}), loss op {result[i][3]:.3f} s, "
                  f"peak +{result[i][1] / 2**20:.0f} MiB, loss {result[i][2]:.6f}", flush=True)
        rows.append((pairs, length, result))
    impls = args.impls.split(",")
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    lines = ["## One training step of SmolLM2-135M: fused vs reference loss", "",
             f"Machine: {machine(device)}; {date}; torch {torch.__version__}, {args.dtype}. "
             f"Command: `python bench/bench_train_step.py {' '.join(sys.argv[1:])}`.".rstrip(),
             "", "A step = policy forward + backward, reference forward, TDPO2 loss (the "
             "training loop's batch_loss), no optimizer update. Rows = 2 x pairs (chosen, then "
             f"rejected); vocabulary {vocab}. Time: median of {args.repeats} after "
             f"{args.warmup} warm-up, the implementations interleaved. Loss op: the loss alone "
             "(forward + backward into the logits) on random logits of that shape. "
             "Peak memory: "
             + ("CUDA max_memory_allocated above the step's start." if device.type == "cuda"
                else "peak resident memory during the step above the resident memory before "
                     "it (Linux VmHWM)."), "",
             "| pairs x tokens | " + " | ".join(f"{i} step (s)" for i in impls) + " | " +
             " | ".join(f"{i} loss op (s)" for i in impls) + " | " +
             " | ".join(f"{i} peak (MiB)" for i in impls) + " | step speed-up | memory saved |",
             "|---|" + "---|" * (3 * len(impls) + 2)]
    for pairs, length, r in rows:
        f, ref_ = r.get("fused"), r.get("reference")
        speed = f"{ref_[0] / f[0]:.2f}x" if f and ref_ else "-"
        saved = f"{(ref_[1] - f[1]) / 2**20:.0f} MiB" if f and ref_ else "-"
        lines.append(f"| {pairs} x {length} | " + " | ".join(f"{r[i][0]:.2f}" for i in impls)
                     + " | " + " | ".join(f"{r[i][3]:.3f}" for i in impls)
                     + " | " + " | ".join(f"{r[i][1] / 2**20:.0f}" for i in impls)
                     + f" | {speed} | {saved} |")
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "a") as fh:
            fh.write(text)
        print(text + f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
