"""The table of kernel cases (tests/kernel_cases.py), through scripts/gpu/sanitizer_case.py,
on the emulated CUDA kernels (tests/cuda_kernels.py) built with AddressSanitizer and
UndefinedBehaviorSanitizer, and separately with ThreadSanitizer: every case must match the
CPU ops, and the sanitizer must report nothing. Each run is a child process of the sanitized interpreter that CMake
builds beside the library (a sanitizer's runtime must be the first thing a process loads).
With the builds (tests/cuda_kernels.py) and test_cuda_matches_cpu.py, 1 min 41 s on a quiet
2-core machine from an empty build folder; 5 minutes on a busy one."""
import os
import re
import subprocess

import pytest

import cuda_kernels

SANITIZER_CASE = os.path.join(cuda_kernels.ROOT, "scripts", "gpu", "sanitizer_case.py")

pytestmark = pytest.mark.skipif(cuda_kernels.missing_build_tools() is not None,
                                reason=str(cuda_kernels.missing_build_tools()))

# What each sanitizer prints when it finds something (each also fails the exit status).
REPORTS = {
    "asan": ("ERROR: AddressSanitizer", "runtime error:"),
    "tsan": ("WARNING: ThreadSanitizer",),
}


def run_sanitized(variant: str, *case_args: str) -> subprocess.CompletedProcess:
    """scripts/gpu/sanitizer_case.py on the `variant` ("asan" or "tsan") build."""
    build_dir = cuda_kernels.build_emulation(variant)
    env = dict(os.environ,
               # torch's CPU ops (the reference) in one thread: ThreadSanitizer cannot see
               # the synchronization of OpenMP's threads, and would report races there.
               OMP_NUM_THREADS="1",
               # Python keeps objects alive at exit by design.
               ASAN_OPTIONS="detect_leaks=0",
               TSAN_OPTIONS="exitcode=66")
    return subprocess.run(
        [os.path.join(build_dir, f"tdpo_python_{variant}"), SANITIZER_CASE, "--emulated",
         os.path.join(build_dir, f"libtdpo_cuda_emulated_{variant}.so"), *case_args],
        capture_output=True, text=True, env=env, cwd=cuda_kernels.ROOT,
        timeout=1800)  # a hang (which the emulation turns into aborts where it can)


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_sanitizer_cases_pass_without_reports(variant):
    result = run_sanitized(variant)
    output = result.stdout + result.stderr
    reports = [line for line in output.splitlines()
               if any(marker in line for marker in REPORTS[variant])]
    assert result.returncode == 0 and not reports, (
        f"exit status {result.returncode}, {len(reports)} sanitizer reports:\n"
        f"{output[-12000:]}")
    assert "\n0 failed" in result.stdout, result.stdout[-4000:]


# What the emulation must say when a kernel breaks a rule of the CUDA execution model that
# a GPU would answer with a hang or undefined values (tests/emulation_faults.cpp).
# Each: where (the thread that finds the fault: any lane of the warp that shuffles), what.
FAULTS = {
    "partial_mask": (r"kernel partial_mask, block 0, thread \d+ \(warp [01], lane \d+\)",
                     "__shfl_xor_sync with mask 0x0000ffff"),
    "lane_returns": (r"kernel lane_returns, block 1, thread \d+ \(warp 1, lane \d+\)",
                     "waits for thread 37 (warp 1, lane 5), which has returned"),
    "lane_at_syncthreads": (
        r"kernel lane_at_syncthreads, block 1, thread \d+ \(warp 0, lane \d+\)",
        "waits for thread 0 (warp 0, lane 0), which waits at __syncthreads"),
}


def run_fault_case(case: str) -> subprocess.CompletedProcess:
    build_dir = cuda_kernels.build_emulation("faults")
    # An emulation that misses a fault hangs where the faulty kernel waits for a lane.
    return subprocess.run([os.path.join(build_dir, "tdpo_emulation_faults"), case],
                          capture_output=True, text=True, timeout=60)


def test_emulation_runs_a_correct_warp_reduction():
    result = run_fault_case("full_shuffle")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sums", "32", "32", "32", "32"]


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_emulation_aborts_naming_kernel_block_and_thread(case):
    result = run_fault_case(case)
    assert result.returncode != 0, f"{case} ran to the end: {result.stdout}"
    where, what = FAULTS[case]
    assert re.search("CUDA emulation: test, " + where, result.stderr), result.stderr
    assert what in result.stderr, result.stderr
