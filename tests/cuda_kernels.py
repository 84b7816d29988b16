"""Where the tests run the CUDA kernels (csrc/cuda/*.cu): on a CUDA device when there is
one, and on every machine on the CPU through the CUDA emulation (csrc/cuda/emulation/),
which this module builds with CMake into build/cuda-emulation/ (the first time; later
only what changed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "cuda-emulation")


@dataclass(frozen=True)
class Kernels:
    """The CUDA ops and the device of their tensors: torch.ops.tdpo_ext on "cuda", or the
    same kernels emulated, torch.ops.tdpo_ext_emulated on "cpu"."""
    name: str
    ops: object
    device: str


def missing_build_tools() -> str | None:
    """Why the emulated kernels cannot be built here, or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: the CUDA emulation needs CMake and a C++ compiler"
    return None


def build_emulation(variant: str = "plain") -> str:
    """Builds the emulated kernels' library of `variant` ("plain", or "asan" / "tsan" with
    its sanitized interpreter, CMakeLists.txt), or with "faults" the emulation's own check
    (tests/emulation_faults.cpp), and returns the build folder."""
    targets = {"plain": ["tdpo_cuda_emulated"], "faults": ["tdpo_emulation_faults"]}.get(
        variant, [f"tdpo_cuda_emulated_{variant}", f"tdpo_python_{variant}"])
    commands = [["cmake", "--build", BUILD_DIR, "--target", *targets]]
    if not os.path.exists(os.path.join(BUILD_DIR, "CMakeCache.txt")):
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        commands.insert(0, [
            "cmake", "-S", ROOT, "-B", BUILD_DIR, *generator, "-DCMAKE_BUILD_TYPE=Release",
            "-DTDPO_EXT_CUDA_EMULATION=ON", f"-DPython3_EXECUTABLE={sys.executable}"])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return BUILD_DIR


def load_emulated(library: str | None = None) -> Kernels:
    """The emulated kernels from `library` (default: built by build_emulation())."""
    if not hasattr(torch.ops.tdpo_ext_emulated, "token_stats"):
        torch.ops.load_library(
            library or os.path.join(build_emulation(), "libtdpo_cuda_emulated.so"))
    return Kernels("emulated", torch.ops.tdpo_ext_emulated, "cpu")


def cuda_device() -> Kernels:
    return Kernels("cuda", torch.ops.tdpo_ext, "cuda")
