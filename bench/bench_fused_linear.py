"""Fused linear TDPO beside the materialized path: time and peak memory.

Op mode (default): a forward + backward from hidden states and LM-head weights, three ways:
  materialized  logits = F.linear(hidden, W) of both models (the reference's under no
                grad), then tdpo_ext.tdpo_loss, backward into hidden and W;
  reference     the same logits, then the TDPO reference implementation's pattern
                (tdpo_ext/reference.py: float32 log_softmax, softmax, log, product, sum);
  fused         tdpo_ext.fused_linear_tdpo_loss(hidden, W, ref_hidden, ref_W, labels).
Train-step mode (--train-step): one optimizer step (AdamW) of SmolLM2-135M with the loss
computed from the models' logits + tdpo_loss, or from the bodies' hidden states + the
LM-head weights + fused_linear_tdpo_loss (what `tdpo-train --fused-linear` does).

    python bench/bench_fused_linear.py                          # SmolLM2 shapes, CPU
    python bench/bench_fused_linear.py --device cuda --shape llama3   # N=8 T=2048 V=128256
    python bench/bench_fused_linear.py --train-step             # SmolLM2 training step
    python bench/bench_fused_linear.py --all --out bench/RESULTS.md

Time: each method in turn within one process (materialized and fused alternating which goes
first, the reference pattern last: see op_order), every call after freeing what the last one
left (release_freed_memory); the median per method and the median of the per-repetition ratios to the
materialized path.
Peak memory beyond inputs and gradients: on CPU, each method in a fresh process: one
warm-up call, then the peak resident set (VmHWM, reset through /proc/self/clear_refs)
above the resident set before the measured call, minus the gradients it creates. Twice:
with glibc's default allocator settings ("RSS"), and with MALLOC_MMAP_THRESHOLD_=65536
("live"), where every freed block of 64 KiB or more goes back to the system at once, so
that the peak is that of live memory rather than of what glibc keeps cached. On CUDA,
torch.cuda.max_memory_allocated above the allocation before the call.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from peak_memory import PeakMemory, release_freed_memory, require_device  # noqa: E402
from tdpo_ext import fused_linear_tdpo_loss, tdpo_loss  # noqa: E402
from tdpo_ext.fused_linear import auto_chunk_size  # noqa: E402
from tdpo_ext.lm_head import lm_head_of  # noqa: E402
from tdpo_ext.reference import reference_tdpo_loss  # noqa: E402

SHAPES = {"smollm2": (8, 512, 576, 49152), "llama3": (8, 2048, 4096, 128256)}
OP_METHODS = ("materialized", "reference", "fused")
STEP_METHODS = ("materialized", "fused")


# ---------------------------------------------------------------------------------------
# Memory

def child_memory(argv: list[str]) -> dict:
    """Runs one method in a fresh process (this script, --child) and returns its JSON."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"}
                                                  if "--live" in argv else {})))
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Op mode

def make_op_inputs(n, t, h, vocab, dtype, device, prompt_frac, seed=0):
    # Drawn on the device itself: at the llama3 shape the two weights are a billion
    # numbers, which a CPU generator would take many seconds to draw.
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device=device) * sc).to(dtype)  # noqa: E731
    hidden = mk(n, t, h).requires_grad_()
    weight = mk(vocab, h, sc=h ** -0.5).requires_grad_()
    ref_hidden, ref_weight = mk(n, t, h), mk(vocab, h, sc=h ** -0.5)
    labels = torch.randint(0, vocab, (n, t), generator=g, device=device)
    labels[:, :int(t * prompt_frac)] = -100  # the prompt
    return hidden, weight, ref_hidden, ref_weight, labels


def op_order(methods, rep):
    """The order of one repetition: materialized and fused alternate which goes first,
    and the reference pattern, whose GiBs of float32 copies disturb whatever follows
    (page faults, the allocator's state), always goes last. A plain rotation of three
    would always put fused right after it."""
    pair = [m for m in methods if m != "reference"]
    pair = pair if rep % 2 == 0 else pair[::-1]
    return pair + [m for m in methods if m == "reference"]


def op_step(method, hidden, weight, ref_hidden, ref_weight, labels):
    """Forward + backward; returns the loss."""
    if method == "fused":
        out = fused_linear_tdpo_loss(hidden, weight, ref_hidden, ref_weight, labels)
    else:
        logits = F.linear(hidden, weight)
        with torch.no_grad():
            ref_logits = F.linear(ref_hidden, ref_weight)
        fn = tdpo_loss if method == "materialized" else reference_tdpo_loss
        out = fn(logits, ref_logits, labels)
        del logits, ref_logits
    out.loss.backward()
    return out.loss.item()


def op_child(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, t, h, vocab = args.dims
    inputs = make_op_inputs(n, t, h, vocab, getattr(torch, args.dtype), device,
                            args.prompt_frac)
    hidden, weight = inputs[:2]
    op_step(args.method, *inputs)  # warm-up
    hidden.grad = weight.grad = None
    with PeakMemory(device) as mem:
        loss = op_step(args.method, *inputs)
    grads = hidden.grad.nbytes + weight.grad.nbytes
    return {"peak": mem.peak, "extra": mem.peak - grads, "grads": grads, "loss": loss}


def bench_op(args, dims, dtype_name, prompt_frac) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    n, t, h, vocab = dims
    dtype = getattr(torch, dtype_name)
    methods = [m for m in args.methods.split(",") if m in OP_METHODS]
    inputs = make_op_inputs(n, t, h, vocab, dtype, device, prompt_frac)
    hidden, weight = inputs[:2]
    times = {m: [] for m in methods}
    losses, failed = {}, {}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        for m in (m for m in op_order(methods, rep) if m not in failed):
            hidden.grad = weight.grad = None
            release_freed_memory(device)  # every call starts from the same state
            start = time.perf_counter()
            try:
                losses[m] = op_step(m, *inputs)
            except torch.OutOfMemoryError as err:
                # The reference pattern's float32 copies may not fit the device: say so
                # in the table and go on with the others.
                failed[m] = "OOM"
                times.pop(m)
                print(f"  {m}: out of memory: {err}", flush=True)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[m].append(time.perf_counter() - start)
            print(f"  {m}: {time.perf_counter() - start:.2f} s", flush=True)
    del inputs, hidden, weight
    result = {"dims": dims, "dtype": dtype_name, "prompt_frac": prompt_frac, "times": times,
              "losses": losses, "failed": failed,
              "chunk": auto_chunk_size(vocab, h, h, dtype, dtype, device)}
    if "materialized" in times:
        result["ratios"] = {m: statistics.median(a / b for a, b in zip(ts,
                                                                        times["materialized"]))
                            for m, ts in times.items()}
    if args.memory:
        gc.collect()
        if device.type == "cuda":
            # Hand this process's cached blocks back, or the children find the device full
            # (on the H100 the timing left 74 of 80 GiB reserved).
            torch.cuda.empty_cache()
        mem = {}
        for m in times:
            child = ["--device", args.device, "--dims", *map(str, dims), "--dtype", dtype_name,
                     "--prompt-frac", str(prompt_frac), "--method", m,
                     "--threads", str(args.threads)]
            try:
                if device.type == "cuda":
                    mem[m] = {"cuda": child_memory(child)}
                else:
                    mem[m] = {"rss": child_memory(child),
                              "live": child_memory(child + ["--live"])}
            except RuntimeError as err:  # e.g. out of memory in the child: its row says "-"
                print(f"  memory {m}: failed: {err}", flush=True)
                continue
            print(f"  memory {m}: {mem[m]}", flush=True)
        result["memory"] = mem
    return result


# ---------------------------------------------------------------------------------------
# Train-step mode

def load_smollm2(device):
    from tdpo_ext.training import models as M

    policy, _ = M.load_model("smollm2", dtype=torch.float32, device=device)
    ref = M.frozen_copy(policy)
    policy.train()
    return policy, ref


def make_step_batch(pairs, length, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * pairs, length), generator=g)
    labels = ids.clone()
    labels[:, :length // 4] = -100  # a quarter of each row is prompt
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def train_step(method, policy, ref, optimizer, ids, mask, labels):
    """One optimizer step of TDPO2; returns the loss."""
    if method == "fused":
        head, ref_head = lm_head_of(policy), lm_head_of(ref)
        hidden = head.body(input_ids=ids, attention_mask=mask,
                           use_cache=False).last_hidden_state
        with torch.no_grad():
            ref_hidden = ref_head.body(input_ids=ids, attention_mask=mask,
                                       use_cache=False).last_hidden_state
        out = fused_linear_tdpo_loss(hidden, head.weight, ref_hidden, ref_head.weight, labels,
                                     policy_bias=head.bias, ref_bias=ref_head.bias)
    else:
        logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with torch.no_grad():
            ref_logits = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = tdpo_loss(logits, ref_logits, labels)
        del logits, ref_logits
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def step_child(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    policy, ref = load_smollm2(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
    batch = make_step_batch(args.pairs, args.tokens, policy.config.vocab_size, device)
    train_step(args.method, policy, ref, optimizer, *batch)  # warm-up; creates Adam state
    with PeakMemory(device) as mem:
        loss = train_step(args.method, policy, ref, optimizer, *batch)
    return {"peak": mem.peak, "loss": loss}


def bench_train_step(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    policy, ref = load_smollm2(device)
    print(f"loaded SmolLM2-135M in {time.time() - t0:.0f} s", flush=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
    batch = make_step_batch(args.pairs, args.tokens, policy.config.vocab_size, device)
    methods = [m for m in args.methods.split(",") if m in STEP_METHODS]
    times = {m: [] for m in methods}
    losses = {}
    for rep in range(args.reps + 1):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        for m in order:
            gc.collect()
            start = time.perf_counter()
            losses[m] = train_step(m, policy, ref, optimizer, *batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[m].append(time.perf_counter() - start)
            print(f"  step {m}: {time.perf_counter() - start:.2f} s", flush=True)
    result = {"pairs": args.pairs, "tokens": args.tokens, "times": times, "losses": losses,
              "ratios": {m: statistics.median(a / b for a, b in zip(times[m],
                                                                    times["materialized"]))
                         for m in methods} if "materialized" in times else {}}
    if args.memory:
        del policy, ref, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # for the children, as in bench_op
        mem = {}
        for m in methods:
            child = ["--train-step", "--device", args.device, "--method", m, "--pairs",
                     str(args.pairs), "--tokens", str(args.tokens), "--threads",
                     str(args.threads)]
            mem[m] = child_memory(child) if device.type == "cuda" else \
                {"rss": child_memory(child), "live": child_memory(child + ["--live"])}
            print(f"  memory {m}: {mem[m]}", flush=True)
        result["memory"] = mem
    return result


# ---------------------------------------------------------------------------------------
# Report

def machine(device) -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host CPU: {cpu})"
    return (f"{cpu}, {os.cpu_count()} cores visible (shared with other jobs: timings are "
            f"noisy, compare the interleaved ratios), torch threads {torch.get_num_threads()}")


def _mib(x):
    return f"{x / 2 ** 20:.0f}"


def _mem_cells(mem: dict, key: str) -> list[str]:
    if "cuda" in mem:
        return [_mib(mem["cuda"][key])]
    return [_mib(mem["rss"][key]), _mib(mem["live"][key])]


def _step_loss(result, method) -> float:
    """The loss of the measured step in the memory child (same weights for every method),
    else the last timed step's (the optimizer moves the weights between timed steps)."""
    mem = result.get("memory", {}).get(method)
    if mem:
        return (mem.get("rss") or mem)["loss"]
    return result["losses"][method]


def report(op_results, step_result, args) -> str:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    lines = ["## Fused linear TDPO (hidden states + LM-head weights, no logits)", "",
             f"Machine: {machine(device)}; {datetime.date.today().isoformat()}; torch "
             f"{torch.__version__}. Command: `python bench/bench_fused_linear.py "
             f"{' '.join(a for a in sys.argv[1:])}`.", ""]
    if op_results:
        mem_cols = ["peak extra (MiB)"] if cuda else ["peak extra RSS (MiB)",
                                                      "peak extra live (MiB)"]
        lines += ["### Forward + backward from hidden states", "",
                  "TDPO2, beta 0.1; the first `prompt` fraction of each row is masked. Time: "
                  f"median of {args.reps} repetitions after a warm-up round (materialized and fused "
                  "alternating which goes first, reference last); "
                  "ratio: median of the per-repetition ratios to the materialized path. "
                  "Peak extra: beyond inputs and gradients (see the script's docstring for "
                  "RSS vs live); one logits tensor is N*T*V*4 bytes in float32.", "",
                  "| N×T×H×V dtype | prompt | method | time (s) | ratio | " +
                  " | ".join(mem_cols) + " | extra / one logits tensor |",
                  "|---|---|---|---|---|" + "---|" * len(mem_cols) + "---|"]
        for r in op_results:
            n, t, h, vocab = r["dims"]
            logits_bytes = n * t * vocab * torch.empty((), dtype=getattr(torch, r["dtype"])
                                                       ).element_size()
            for m, ts in r["times"].items():
                mem = r.get("memory", {}).get(m)
                cells = _mem_cells(mem, "extra") if mem else ["-"] * len(mem_cols)
                worst = max(v["extra"] for v in mem.values()) if mem else None
                frac = f"{worst / logits_bytes:.3f}" if mem else "-"
                ratio = r.get("ratios", {}).get(m)
                lines.append(f"| {n}×{t}×{h}×{vocab} {r['dtype']} | {r['prompt_frac']:g} | {m}"
                             f" | {statistics.median(ts):.2f} | "
                             f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                             + " | ".join(cells) + f" | {frac} |")
            lines += [f"| {n}×{t}×{h}×{vocab} {r['dtype']} | {r['prompt_frac']:g} | {m} | "
                      f"{why} | - | " + " | ".join(["-"] * len(mem_cols)) + " | - |"
                      for m, why in r.get("failed", {}).items()]
            lines.append("")
        lines.append("Automatic chunk size (the working-memory budget, counted in tokens' "
                     "whole logits rows) at these shapes: " + ", ".join(
            f"{r['chunk']} tokens ({'×'.join(map(str, r['dims']))} {r['dtype']})"
            for r in op_results[:1]) + ".")
        lines.append("")
    if step_result:
        s = step_result
        mem_cols = ["peak (MiB)"] if cuda else ["peak RSS (MiB)", "peak live (MiB)"]
        lines += ["### One training step of SmolLM2-135M", "",
                  f"{2 * s['pairs']} rows (= {s['pairs']} pairs) × {s['tokens']} tokens, a "
                  "quarter of each row prompt, float32, TDPO2: policy forward + backward, "
                  "reference forward, loss, AdamW step. materialized: the models' logits + "
                  "tdpo_loss; fused: the bodies' hidden states + the (tied) LM-head weight + "
                  "fused_linear_tdpo_loss (`tdpo-train --fused-linear`). Peak: above the "
                  "memory before the step (model, reference, Adam state), after a warm-up "
                  "step; loss: that measured step's (same weights for both methods).", "",
                  "| method | time (s) | ratio | " + " | ".join(mem_cols) + " | loss |",
                  "|---|---|---|" + "---|" * len(mem_cols) + "---|"]
        for m, ts in s["times"].items():
            mem = s.get("memory", {}).get(m)
            cells = ([_mib(mem["peak"])] if cuda else _mem_cells(mem, "peak")) if mem \
                else ["-"] * len(mem_cols)
            ratio = s["ratios"].get(m)
            lines.append(f"| {m} | {statistics.median(ts):.2f} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | " + " | ".join(cells)
                         + f" | {_step_loss(s, m):.6f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default=None,
                   help="smollm2 (8x512x576x49152), llama3 (8x2048x4096x128256) or NxTxHxV; "
                        "default smollm2 on cpu, llama3 on cuda")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--prompt-fracs", default="0,0.25",
                   help="comma-separated fractions of each row masked as prompt (memory is "
                        "measured at the first only)")
    p.add_argument("--methods", default=None)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--train-step", action="store_true", help="the SmolLM2 training step")
    p.add_argument("--all", action="store_true", help="op mode, then the training step")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", default="-", help="write the markdown here (- : stdout only)")
    # Internal: one memory measurement in a fresh process.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--dims", type=int, nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--prompt-frac", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    require_device(args.device)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.child:
        print(json.dumps(step_child(args) if args.train_step else op_child(args)))
        return
    if args.methods is None:
        args.methods = ",".join(STEP_METHODS if args.train_step else OP_METHODS)
    op_results, step_result = [], None
    if not args.train_step or args.all:
        shape = args.shape or ("llama3" if cuda else "smollm2")
        dims = SHAPES.get(shape) or tuple(int(x) for x in shape.split("x"))
        memory = args.memory
        for frac in (float(f) for f in args.prompt_fracs.split(",")):
            print(f"op {dims} {args.dtype} prompt {frac}", flush=True)
            op_results.append(bench_op(args, dims, args.dtype, frac))
            args.memory = False  # measured at the first prompt fraction only (the worst case)
        args.memory = memory
    if args.train_step or args.all:
        if args.all:
            args.methods = ",".join(STEP_METHODS)
        print(f"train step {args.pairs} pairs x {args.tokens} tokens", flush=True)
        step_result = bench_train_step(args)
    text = report(op_results, step_result, args)
    print(text)
    if args.out != "-":
        with open(args.out, "a") as f:  # RESULTS.md collects every benchmark's section
            f.write("\n" + text)
        with open(os.path.splitext(args.out)[0] + "_fused_linear.json", "w") as f:
            json.dump({"op": op_results, "train_step": step_result}, f, indent=1)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
