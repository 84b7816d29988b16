"""Forward+backward of tdpo_ext.tdpo_loss beside the TDPO reference pattern, in eager
PyTorch and under torch.compile: time, achieved bandwidth and peak memory.

    python bench/bench_ops.py --device cpu --out bench/RESULTS.md
    python bench/bench_ops.py --device cuda --out bench/RESULTS.md
    python bench/bench_ops.py --device cpu --quick

The three implementations are timed on the same inputs in one process, interleaved rep
by rep, and compared by their medians; each one's peak memory is measured in a process
of its own, so that no implementation's allocations or compiled code are counted against
another. On CPU the timing runs twice, with torch's default allocator and with
THP_MEM_ALLOC_ENABLE=1 (2 MiB-aligned allocations backed by transparent huge pages), since
the first-touch page faults of a fresh (N, T, V) gradient can cost as much as a kernel.
With --baseline DIR the script instead times this checkout's op against another build
of it (DIR holds a tdpo_ext package, e.g. a copy of main's with its _C*.so): worker
processes of the two builds alternate, round after round, and the section reports the
time ratio of each round. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# The in-place build of tdpo_ext, or in a worker of --baseline the other build's directory.
PACKAGE_ROOT_ENV = "TDPO_BENCH_PACKAGE_ROOT"
sys.path.insert(0, os.environ.get(PACKAGE_ROOT_ENV, str(Path(__file__).resolve().parents[1])))
import tdpo_ext  # noqa: E402
from peak_memory import PeakMemory, require_device  # noqa: E402  (bench/, this script's folder)
from tdpo_ext.ops import pairwise_output  # noqa: E402
from tdpo_ext.reference import reference_tdpo_loss  # noqa: E402

IMPLS = ("ours", "eager", "compile")
IGNORE_INDEX = -100
HYPER = dict(beta=0.1, alpha=0.5, variant="tdpo2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# V=128256 in float32 at N=8, T=512 is 2 GiB per logits tensor, and the eager reference
# holds ~4 float32 (N, T, V) temporaries beside the inputs and gradient (~15 GiB in all):
# N=4 halves that, to stay clear of the other jobs on a shared 24 GiB machine.
DEFAULT_SHAPES = {
    "cpu": "8x512x32000:float32,8x512x32000:bfloat16,4x512x128256:float32",
    "cuda": "8x2048x128256:bfloat16,8x2048x128256:float32,"
            "8x2048x32000:bfloat16,8x2048x32000:float32",
}
QUICK_SHAPES = "4x128x4096:float32,4x128x4096:bfloat16"
DEFAULT_REPS = {"cpu": 5, "cuda": 20}
DEFAULT_ROUNDS = 6  # --baseline: worker processes per build, alternating
WARMUP_CALLS = {"cpu": 1, "cuda": 3}  # the first call of each also pays for compilation
COPY_BYTES = 1 << 30  # large enough that no cache holds it

# Targets of the issues, checked against the row they name (CPU) or every row (CUDA).
CPU_TARGET_CASE = "8x512x32000:float32"
CPU_TARGETS = dict(eager_speedup=8.0, compile_speedup=3.0, extra_mib=64.0)
CUDA_TARGETS = dict(copy_fraction=0.8, compile_speedup=3.0, extra_fraction=0.05)

MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    n: int
    t: int
    v: int
    dtype: str

    @classmethod
    def parse(cls, text: str) -> "Case":
        dims, _, dtype = text.partition(":")
        n, t, v = (int(x) for x in dims.split("x"))
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} in {text!r}; expected one of {list(DTYPES)}")
        return cls(n, t, v, dtype)

    def __str__(self) -> str:
        return f"{self.n}x{self.t}x{self.v}:{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def logits_bytes(self) -> int:
        return self.n * self.t * self.v * self.torch_dtype.itemsize


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Inputs and the step being measured

def make_inputs(case: Case, device: str, seed: int):
    """Policy and reference logits close to each other, as after a few training steps,
    and labels whose prompt (a random ~25% of each row) is masked with IGNORE_INDEX."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape, kw = (case.n, case.t, case.v), dict(device=device, dtype=case.torch_dtype)
    # In-place arithmetic: no (N, T, V) temporaries to inflate the worker's footprint.
    ref = torch.randn(shape, generator=gen, **kw).mul_(2.0)
    policy = torch.randn(shape, generator=gen, **kw).mul_(0.1).add_(ref).requires_grad_()
    labels = torch.randint(0, case.v, (case.n, case.t), generator=gen, device=device)
    prompt = torch.randint(case.t // 8, 3 * case.t // 8 + 1, (case.n, 1), generator=gen,
                           device=device)
    labels.masked_fill_(torch.arange(case.t, device=device) < prompt, IGNORE_INDEX)
    return policy, ref, labels


def loss_fn(impl: str):
    """loss(policy, ref, labels) for one implementation; all use the same hyperparameters."""
    def eager(p, r, y):
        return reference_tdpo_loss(p, r, y, **HYPER).loss

    if impl == "ours":
        return lambda p, r, y: tdpo_ext.tdpo_loss(p, r, y, **HYPER).loss
    if impl == "eager":
        return eager
    return torch.compile(eager, dynamic=False)


def fwd_bwd(fn, inputs) -> None:
    policy, ref, labels = inputs
    # Every call allocates its gradient afresh, as a training step's first micro-batch
    # does, so all implementations pay the same for it.
    policy.grad = None
    fn(policy, ref, labels).backward()


# ---------------------------------------------------------------------------------------
# Device-specific timing and memory probes

def make_timer(device: str):
    """timer(fn) -> seconds that fn took to finish on the device."""
    if device == "cuda":
        def cuda_timer(fn):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            torch.cuda.synchronize()  # nothing earlier may run inside the timed region
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_timer

    def cpu_timer(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu_timer


def copy_bandwidth(device: str, timer, reps: int = 10) -> float:
    """Bytes read plus written per second by dst.copy_(src) of COPY_BYTES, in GB/s."""
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch outside the timed copies
    seconds = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(reps))
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()  # give the 2 GiB back before the (larger) inputs
    return 2 * COPY_BYTES / seconds / 1e9


# ---------------------------------------------------------------------------------------
# Bytes that our fused forward+backward moves

def rows_with_kl_gradient(policy, ref, labels) -> torch.Tensor:
    """(N,) bool: rows whose per-token KL receives a nonzero gradient. The backward reads
    the reference logits only there (TDPO2 stops the chosen rows' KL gradient)."""
    with torch.no_grad():
        margin, seq_kl, logps = tdpo_ext.sequence_stats(policy, ref, labels,
                                                        ignore_index=IGNORE_INDEX)
    seq_kl.requires_grad_()
    loss = pairwise_output(margin, seq_kl, logps, **HYPER).loss
    (grad,) = torch.autograd.grad(loss, seq_kl, allow_unused=True)
    return torch.zeros_like(seq_kl, dtype=torch.bool) if grad is None else grad != 0


def bytes_moved(case: Case, inputs) -> int:
    """Forward: policy and reference rows of every unmasked token, once. Backward: the
    policy rows again, the reference rows where the KL gradient is nonzero, and the whole
    (N, T, V) gradient written (masked positions get zeros). O(N*T) terms are left out."""
    policy, ref, labels = inputs
    live = (tdpo_ext.shift_labels(labels, IGNORE_INDEX) != IGNORE_INDEX).sum(-1)
    kl_rows = rows_with_kl_gradient(policy, ref, labels)
    sp, sr = policy.element_size(), ref.element_size()
    forward = int(live.sum()) * case.v * (sp + sr)
    backward = (int(live.sum()) * case.v * sp + int(live[kl_rows].sum()) * case.v * sr
                + case.n * case.t * case.v * sp)
    return forward + backward


# ---------------------------------------------------------------------------------------
# Workers (each run in a subprocess of its own)

def input_set_count(case: Case, device: str, requested: int) -> int:
    """Rotating input sets keep one call's data out of the next call's cache; on CUDA the
    sets share memory with the reference's (N, T, V) temporaries, so use at most a
    quarter of the device for them (tensors of GBs dwarf a 50 MB L2 anyway)."""
    if device != "cuda":
        return requested
    per_set = 2 * case.logits_bytes
    budget = torch.cuda.get_device_properties(0).total_memory // 4
    return max(1, min(requested, budget // per_set))


def timing_worker(case: Case, device: str, reps: int, input_sets: int,
                  impls: tuple[str, ...] = IMPLS) -> dict:
    load_before = os.getloadavg()[0]  # other jobs on a shared machine inflate the times
    timer = make_timer(device)
    bandwidth = copy_bandwidth(device, timer)
    sets = [make_inputs(case, device, seed) for seed in range(input_set_count(case, device,
                                                                               input_sets))]
    fns = {impl: loss_fn(impl) for impl in impls}
    calls = 0

    def timed(impl):
        # Round robin over the input sets on every call, not every rep, so that no call
        # finds its inputs left in cache by the call before it.
        nonlocal calls
        inputs = sets[calls % len(sets)]
        calls += 1
        return timer(lambda: fwd_bwd(fns[impl], inputs))

    first_call, failed = {}, {}
    for impl in impls:
        try:
            first_call[impl] = timed(impl)
            for _ in range(WARMUP_CALLS[device] - 1):
                timed(impl)
        except torch.OutOfMemoryError as err:
            # What it had allocated is freed on leaving this block, for the next one.
            failed[impl] = "OOM"
            log(f"  {impl}: {err}")
        log(f"  {impl}: first call {first_call.get(impl, float('nan')):.2f} s")

    times = {impl: [] for impl in impls if impl not in failed}
    for rep in range(reps):
        order = [impl for impl in impls[rep % len(impls):] + impls[:rep % len(impls)]
                 if impl in times]
        for impl in order:
            times[impl].append(timed(impl))
        log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{i} {times[i][-1] * 1e3:.0f} ms"
                                                     for i in order))
    return dict(median_s={impl: statistics.median(ts) for impl, ts in times.items()},
                times_s=times, first_call_s=first_call, failed=failed,
                bytes=bytes_moved(case, sets[0]), copy_gbps=bandwidth, input_sets=len(sets),
                threads=torch.get_num_threads(), load=[load_before, os.getloadavg()[0]],
                package=str(Path(tdpo_ext.__file__).parent))


def memory_worker(case: Case, device: str, impl: str) -> dict:
    inputs = make_inputs(case, device, seed=0)
    fn = loss_fn(impl)
    try:
        # Compilation, thread pools and lazy initialization happen outside the measured call.
        fwd_bwd(fn, inputs)
        inputs[0].grad = None
        with PeakMemory(torch.device(device)) as mem:
            fwd_bwd(fn, inputs)
    except torch.OutOfMemoryError:
        return dict(failed="OOM")
    grad_bytes = inputs[0].grad.nbytes
    return dict(extra_bytes=mem.peak - grad_bytes, peak_bytes=mem.peak, grad_bytes=grad_bytes)


def run_worker(argv: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, *argv, "--result", str(result)], env=env,
                       check=True)
        return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------
# Tables

def fmt(x, spec=".0f", missing="—") -> str:
    return missing if x is None else format(x, spec)


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def ratio(timing: dict, baseline: str):
    """Baseline's median time over ours (how many times faster we are)."""
    med = timing["median_s"]
    return med[baseline] / med["ours"] if baseline in med and "ours" in med else None


def ours_gbps(timing: dict):
    med = timing["median_s"]
    return timing["bytes"] / med["ours"] / 1e9 if "ours" in med else None


def copy_fraction(timing: dict):
    gbps = ours_gbps(timing)
    return None if gbps is None else gbps / timing["copy_gbps"]


def shape_cells(case: Case) -> list[str]:
    return [f"{case.n}×{case.t}×{case.v}", case.dtype]


def time_row(case: Case, alloc: str, timing: dict) -> str:
    def ms(impl):
        """Median, then the range over reps (the noise of a shared machine)."""
        if impl not in timing["median_s"]:
            return timing["failed"].get(impl, "—")
        spec = ".1f" if timing["median_s"][impl] < 0.1 else ".0f"
        times = timing["times_s"][impl]
        return (f"{fmt(timing['median_s'][impl] * 1e3, spec)} "
                f"({fmt(min(times) * 1e3, spec)}–{fmt(max(times) * 1e3, spec)})")

    frac = copy_fraction(timing)
    cells = [*shape_cells(case), alloc, *map(ms, IMPLS),
             fmt(ratio(timing, "eager"), ".1f"), fmt(ratio(timing, "compile"), ".1f"),
             fmt(ours_gbps(timing), ".1f"), fmt(timing["copy_gbps"], ".1f"),
             fmt(None if frac is None else frac * 100, ".0f"),
             fmt(timing["first_call_s"].get("compile"), ".0f"),
             "–".join(fmt(x, ".1f") for x in timing["load"])]
    return "| " + " | ".join(cells) + " |"


def memory_row(case: Case, memory: dict) -> str:
    def mib(impl):
        m = memory[impl]
        return m["failed"] if "failed" in m else fmt(m["extra_bytes"] / MIB, ".1f")

    # The gradient has the policy's shape and dtype.
    cells = [*shape_cells(case), fmt(2 * case.logits_bytes / MIB), fmt(case.logits_bytes / MIB),
             *map(mib, IMPLS)]
    return "| " + " | ".join(cells) + " |"


def target_lines(device: str, results: dict) -> list[str]:
    def check(label, value, goal, ok):
        verdict = "**met**" if value is not None and ok(value) else "**not met**"
        return f"{label} {fmt(value, '.2f')} ({goal}): {verdict}"

    def extra_bytes(res):
        return res["memory"]["ours"].get("extra_bytes")  # None where ours ran out of memory

    if device == "cpu":
        res = results.get(CPU_TARGET_CASE)
        if res is None:
            return [f"Targets: not checked ({CPU_TARGET_CASE} was not run)."]
        timing, extra = res["timing"]["default"], extra_bytes(res)
        t = CPU_TARGETS
        return [f"Targets at {CPU_TARGET_CASE}, default allocator:",
                "- " + check("eager/ours", ratio(timing, "eager"),
                             f"target ≥ {t['eager_speedup']}", lambda x: x >= t["eager_speedup"]),
                "- " + check("compile/ours", ratio(timing, "compile"),
                             f"target ≥ {t['compile_speedup']}",
                             lambda x: x >= t["compile_speedup"]),
                "- " + check("MiB beyond inputs and gradient",
                             None if extra is None else extra / MIB,
                             f"target ≤ {t['extra_mib']}", lambda x: x <= t["extra_mib"])]

    t = CUDA_TARGETS
    lines = ["Targets, every shape:"]
    for key, res in results.items():
        timing, extra = res["timing"]["default"], extra_bytes(res)
        per_ntv = None if extra is None else extra / Case.parse(key).logits_bytes
        lines.append(f"- {key}: " + "; ".join((
            check("fraction of copy bandwidth", copy_fraction(timing),
                  f"target ≥ {t['copy_fraction']}", lambda x: x >= t["copy_fraction"]),
            check("compile/ours", ratio(timing, "compile"),
                  f"target ≥ {t['compile_speedup']}", lambda x: x >= t["compile_speedup"]),
            check("extra memory / one (N, T, V) tensor", per_ntv,
                  f"target < {t['extra_fraction']}", lambda x: x < t["extra_fraction"]))))
    return lines


def render(device: str, results: dict, reps: int) -> str:
    any_timing = next(iter(results.values()))["timing"]["default"]
    capability = tdpo_ext._C.cpu_kernel_capability()
    kernels = f"CUDA build: {tdpo_ext.built_with_cuda()}" if device == "cuda" else \
        f"CPU kernels: {capability}, {any_timing['threads']} torch threads"
    header = [
        f"## tdpo_loss forward+backward, {device}: {machine_name(device)} "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"torch {torch.__version__}, tdpo_ext {tdpo_ext.__version__} ({kernels}); "
        f"variant {HYPER['variant']} (beta {HYPER['beta']}, alpha {HYPER['alpha']}); "
        f"times: median (min–max) of {reps} reps per implementation.",
        "",
        "| N×T×V | dtype | allocator | ours ms | eager ms | compile ms | eager/ours "
        "| compile/ours | ours GB/s | copy GB/s | % of copy | compile warm-up s | load |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    rows = [time_row(Case.parse(key), alloc, timing)
            for key, res in results.items() for alloc, timing in res["timing"].items()]
    memory = [
        "",
        "Peak memory beyond the inputs and the gradient, MiB (each implementation in its "
        "own process):",
        "",
        "| N×T×V | dtype | inputs MiB | gradient MiB | ours | eager | compile |",
        "|---|---|--:|--:|--:|--:|--:|",
        *(memory_row(Case.parse(key), res["memory"]) for key, res in results.items()),
    ]
    sets = sorted({t["input_sets"] for res in results.values() for t in res["timing"].values()})
    method = [
        "",
        "Method. *Time*: forward + backward of `.loss` w.r.t. the policy logits (the "
        "reference logits need no gradient; labels mask a random 12-37% prompt of each row "
        "with -100); `policy.grad = None` before every call, so each implementation "
        "allocates its gradient; the three implementations take turns on the same inputs "
        f"in one process (the order rotating each rep; {'/'.join(map(str, sets))} input "
        "set(s) used round robin), "
        + ("timed with CUDA events after 3 warm-up calls. "
           if device == "cuda" else "timed with perf_counter after 1 warm-up call. ")
        + "*eager* is tdpo_ext.reference.reference_tdpo_loss (log_softmax, softmax, log, "
        "product and sum over float32 copies); *compile* is that function under "
        "torch.compile(dynamic=False), its warm-up (compilation; it may hit Inductor's "
        "on-disk cache) excluded from the median and shown in its own column. "
        + ("*allocator* THP is a second process with THP_MEM_ALLOC_ENABLE=1 (torch's CPU "
           "allocator hands out 2 MiB-aligned, huge-page-backed blocks). "
           if device == "cpu" else "")
        + "*GB/s*: the bytes our fused kernels must move (forward reads the policy and "
        "reference rows of every unmasked token; backward reads the policy rows again, the "
        "reference rows only where the KL gradient is nonzero, i.e. TDPO2's rejected rows, "
        "and writes the whole gradient) divided by our median time; *copy* is the median of "
        f"dst.copy_(src) over {COPY_BYTES // MIB} MiB, counting read + write, in the same "
        "process. *load*: the 1-minute load average before and after the timing "
        "(other jobs on the machine slow every implementation). *Memory*: "
        + ("in a fresh process per implementation: inputs made, one warm-up call, "
           "torch.cuda.reset_peak_memory_stats(); extra = max_memory_allocated() - "
           "memory_allocated() before the call - gradient bytes."
           if device == "cuda" else
           "in a fresh process per implementation (default allocator): inputs made, one "
           "warm-up call, policy.grad dropped, gc + malloc_trim, then VmHWM reset to VmRSS "
           "by writing 5 to /proc/self/clear_refs; extra = VmHWM after the measured call - "
           "VmRSS before it - gradient bytes."),
    ]
    return "\n".join(header + rows + memory + method + [""] + target_lines(device, results)) + "\n"


def render_builds(device: str, results: dict, reps: int, baseline: Path) -> str:
    """The section of a --baseline run: per shape, each build's median over rounds of its
    workers' median times, and the ratio this / baseline of every round."""
    first = next(iter(results.values()))
    header = [
        f"## tdpo_loss forward+backward, this build / baseline build, {device}: "
        f"{machine_name(device)} "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"torch {torch.__version__}; this build {first['package']['this']}, baseline "
        f"{first['package']['baseline']} (--baseline {baseline}); CPU kernels: "
        f"{tdpo_ext._C.cpu_kernel_capability()}; variant {HYPER['variant']}. Each round "
        f"runs one worker process per build, the order alternating round by round; a "
        f"worker's time is the median of {reps} calls after 1 warm-up.",
        "",
        "| N×T×V | dtype | rounds | this ms | baseline ms | this / baseline: median "
        "(min–max) of the rounds' ratios | load |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    rows = []
    for key, res in results.items():
        case, ratios = Case.parse(key), res["ratios"]
        loads = [x for load in res["load"] for x in load]
        rows.append("| " + " | ".join([
            *shape_cells(case), str(len(ratios)),
            fmt(statistics.median(res["times_s"]["this"]) * 1e3),
            fmt(statistics.median(res["times_s"]["baseline"]) * 1e3),
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})",
            f"{min(loads):.1f}–{max(loads):.1f}"]) + " |")
    return "\n".join(header + rows) + "\n"


# ---------------------------------------------------------------------------------------
# Driver

def compare_builds(case: Case, device: str, reps: int, rounds: int, baseline: Path) -> dict:
    """This build's op against the baseline's, one worker process per build and round."""
    this_env = {k: v for k, v in os.environ.items() if k != PACKAGE_ROOT_ENV}
    envs = {"this": this_env, "baseline": {**this_env, PACKAGE_ROOT_ENV: str(baseline)}}
    argv = ["--worker", "timing", "--impl", "ours", "--case", str(case), "--device", device,
            "--reps", str(reps), "--input-sets", "1"]
    times, package, load = {b: [] for b in envs}, {}, []
    for round_ in range(rounds):
        for build in (list(envs) if round_ % 2 == 0 else list(envs)[::-1]):
            res = run_worker(argv, envs[build])
            times[build].append(res["median_s"]["ours"])
            package[build] = res["package"]
            load.append(res["load"])
        log(f"{case}: round {round_ + 1}/{rounds}: this {times['this'][-1] * 1e3:.0f} ms, "
            f"baseline {times['baseline'][-1] * 1e3:.0f} ms")
    ratios = [t / b for t, b in zip(times["this"], times["baseline"])]
    return dict(times_s=times, ratios=ratios, package=package, load=load)


def bench_case(case: Case, device: str, reps: int, input_sets: int) -> dict:
    base_env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    allocators = {"default": base_env}
    if device == "cpu":
        allocators["THP"] = {**base_env, "THP_MEM_ALLOC_ENABLE": "1"}
    common = ["--case", str(case), "--device", device]
    timing = {}
    for alloc, env in allocators.items():
        log(f"{case}: timing, {alloc} allocator")
        timing[alloc] = run_worker(["--worker", "timing", *common, "--reps", str(reps),
                                    "--input-sets", str(input_sets)], env)
    memory = {}
    for impl in IMPLS:
        log(f"{case}: peak memory of {impl}")
        memory[impl] = run_worker(["--worker", "memory", *common, "--impl", impl], base_env)
    return dict(timing=timing, memory=memory)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help=f"smoke test on {QUICK_SHAPES}")
    ap.add_argument("--shapes", help="comma-separated NxTxV:dtype (default per device)")
    ap.add_argument("--reps", type=int, help="timed calls per implementation "
                    f"(default {DEFAULT_REPS})")
    ap.add_argument("--input-sets", type=int, default=None,
                    help="input sets used round robin (default: 3 on cuda, 1 on cpu, where "
                         "GB-sized tensors cannot stay in cache)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, help="append the markdown section to this file")
    ap.add_argument("--baseline", type=Path,
                    help="a directory holding another build of the tdpo_ext package: time "
                         "this build's op against it instead (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                    help=f"--baseline: worker processes per build (default {DEFAULT_ROUNDS})")
    # Internal: what a subprocess measures.
    ap.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # one, or all (timing)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the workers' torch
    require_device(args.device)
    reps = args.reps or (3 if args.quick else DEFAULT_REPS[args.device])
    input_sets = args.input_sets or (3 if args.device == "cuda" else 1)

    if args.worker:
        case = Case.parse(args.case)
        impls = (args.impl,) if args.impl else IMPLS
        result = (timing_worker(case, args.device, reps, input_sets, impls)
                  if args.worker == "timing" else memory_worker(case, args.device, args.impl))
        args.result.write_text(json.dumps(result))
        return

    shapes = QUICK_SHAPES if args.quick else args.shapes or DEFAULT_SHAPES[args.device]
    section_start = start_section(args.out) if args.out else None
    if args.baseline and not (args.baseline / "tdpo_ext" / "__init__.py").is_file():
        sys.exit(f"--baseline {args.baseline}: no tdpo_ext package in that directory")
    results = {}
    for case in map(Case.parse, shapes.split(",")):
        if args.baseline:
            results[str(case)] = compare_builds(case, args.device, reps, args.rounds,
                                                args.baseline.resolve())
            section = render_builds(args.device, results, reps, args.baseline)
        else:
            results[str(case)] = bench_case(case, args.device, reps, input_sets)
            section = render(args.device, results, reps)
        if args.out:
            write_section(args.out, section_start, section)
    print(section)


def start_section(path: Path) -> int:
    """Opens this run's section at the end of path (a new file gets a title); returns
    the offset where the section goes."""
    with path.open("a") as f:
        f.write("\n" if f.tell() else "# Benchmark results\n\n")
        return f.tell()


def write_section(path: Path, start: int, section: str) -> None:
    """(Re)writes this run's section after every shape, so that the shapes finished so
    far survive a run cut short by a time limit."""
    with path.open("r+") as f:
        f.seek(start)
        f.truncate()
        f.write(section)


if __name__ == "__main__":
    main()
