"""The cases of scripts/gpu/sanitizer_case.py on the emulated CUDA kernels
(tests/cuda_kernels.py) built with AddressSanitizer and UndefinedBehaviorSanitizer, and
separately with ThreadSanitizer: every case must match the CPU ops, and the sanitizer
must report nothing. Each run is a child process of the sanitized interpreter that CMake
builds beside the library (a sanitizer's runtime must be the first thing a process loads).
With the builds (tests/cuda_kernels.py), about 3 minutes of CPU time on two cores: 5
minutes of wall time on a busy machine."""
import os
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
