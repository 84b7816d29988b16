"""Runs the table of kernel cases (tests/kernel_cases.py) on the CUDA kernels of
tdpo_ext: each case reaches a code path of a kernel (token_stats and its backward,
token_stats_tile and token_stats_finish, preference_loss and its backward) and holds the
result to the CPU op's on the same inputs, within the tests' tolerances
(tests/kernel_checks.py, tests/error_bounds.py); bad labels must raise the CPU op's
RuntimeError, not a device-side assert, and leave the device usable.
scripts/gpu/gpu_check.sh runs it as it is and under compute-sanitizer memcheck and
racecheck:

    python scripts/gpu/sanitizer_case.py

With --emulated LIBRARY, the same cases run the kernels on the CPU through the CUDA
emulation (csrc/cuda/emulation/; LIBRARY is CMake's libtdpo_cuda_emulated.so), as
tests/test_cuda_emulation.py does under AddressSanitizer and ThreadSanitizer:

    python scripts/gpu/sanitizer_case.py --emulated build/.../libtdpo_cuda_emulated.so

Exit status: 0 when every case passed, 1 otherwise, 2 without a GPU or without the CUDA
kernels (and without --emulated).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# An in-place build of tdpo_ext, and the table with its helpers beside the tests.
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import cuda_kernels  # noqa: E402
import tdpo_ext  # noqa: E402
from kernel_cases import CASES  # noqa: E402


def kernels_to_run(emulated: str | None) -> cuda_kernels.Kernels | str:
    """The kernels under test, or why there are none here."""
    if emulated:
        return cuda_kernels.load_emulated(emulated)
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not tdpo_ext.built_with_cuda():
        return "tdpo_ext was built without CUDA kernels"
    return cuda_kernels.cuda_device()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", metavar="LIBRARY",
                        help="run the emulated kernels of this libtdpo_cuda_emulated.so")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="run only the cases whose name contains TEXT")
    args = parser.parse_args()
    kernels = kernels_to_run(args.emulated)
    if isinstance(kernels, str):
        print(kernels, file=sys.stderr)
        return 2
    failures = []
    for entry in CASES:
        if args.only not in entry.name:
            continue
        try:
            entry.run(kernels)
            print(f"ok    {entry.name}", flush=True)
        except Exception:  # noqa: BLE001  (every failure is reported, then the next case runs)
            failures.append(entry.name)
            print(f"FAIL  {entry.name} on {kernels.name}\n{traceback.format_exc()}", flush=True)
    if kernels.device == "cuda":
        torch.cuda.synchronize()
    print(f"{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
