"""`pip install` as users type it, in fresh virtual environments: with torch installed it
builds against that torch, isolated build (pyproject.toml) or not, on the machine's pip and
on the newest; without torch it stops at once with one line saying what to run, and never
fetches a torch to compile against. The wheel of `pip wheel .` installs into another fresh
environment with the same torch and imports from outside the checkout.

The environments that have torch see the torch of the environment pytest runs in
(tests/environments.py), after the new environment's own packages, so everything tdpo-ext
installs goes into the new environment. That is still a faithful test of
build isolation: pip's isolated build hides those folders too, so the build must find torch
exactly as it does in a user's environment, instead of downloading 3 GB of torch and its
CUDA libraries for each run.

The build hides nvcc (PATH without it, no CUDA_HOME): the CPU-only build is the quick one,
and it is the case whose end-of-build notice and run-time refusal are checked here. One
full build; the other builds run in the same environment and tree and reuse its objects.
Skipped only when no package index is reachable (the isolated build installs setuptools
and ninja from it)."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from environments import make_venv

from tdpo_ext.ops import NO_CUDA_KERNELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_SOURCE_PATTERNS = shutil.ignore_patterns(
    ".git", "build", "dist", "runs", "tmp", "*.so", "*.egg-info", "__pycache__",
    ".pytest_cache", ".hypothesis")


def not_sources(folder, names):
    """What the copy of the checkout leaves out: build outputs, caches, and any virtual or
    conda environment inside it (users keep theirs in `.venv/`: gigabytes of torch)."""
    return _NOT_SOURCE_PATTERNS(folder, names) | {
        n for n in names if os.path.exists(os.path.join(folder, n, "pyvenv.cfg"))
        or os.path.isdir(os.path.join(folder, n, "conda-meta"))}
TORCH_RELEASE = torch.__version__.split("+")[0]
NOTICE = "tdpo_ext: built WITHOUT CUDA kernels"


def _read_no_torch_message() -> str:
    """setup.py's NO_TORCH, read from its source (setup.py cannot be imported: it builds)."""
    import ast

    with open(os.path.join(ROOT, "setup.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NO_TORCH":
                return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NO_TORCH")


def _build_env() -> dict:
    """This process's environment without nvcc, CUDA_HOME, the CUDA switch and the
    PYTHONPATH that may point at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "TDPO_EXT_CUDA", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not os.path.exists(os.path.join(d, "nvcc")))
    return env


def run(args, cwd, timeout=600):
    """(exit status, stdout and stderr together) of args."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_build_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout


def must_run(args, cwd, timeout=600) -> str:
    status, output = run(args, cwd, timeout)
    assert status == 0, f"{' '.join(map(str, args))} failed:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the checkout's sources, and the build tools and newest pip from the index
    (skips without one)."""
    work = tmp_path_factory.mktemp("install")
    tools = work / "tools"
    status, output = run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tools,
                          "setuptools>=70.1", "ninja", "pip"], cwd=work, timeout=300)
    if status != 0:
        pytest.skip(f"no package index to install from: {output.strip().splitlines()[-1:]}")
    shutil.copytree(ROOT, work / "src", ignore=not_sources)
    return work


def tool(work, name) -> str:
    (path,) = glob.glob(str(work / "tools" / f"{name}-*.whl"))
    return path


IMPORT_CHECK = r'''
import torch, tdpo_ext
from torch._C import DispatchKey, DispatchKeySet
logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, 2, 3], [4, 0, -100]])
print(f"file={tdpo_ext.__file__}")
print(f"torch={torch.__version__}")
print(f"cuda_kernels={tdpo_ext.built_with_cuda()}")
print(f"loss={float(tdpo_ext.tdpo_loss(logits, logits, labels).loss)}")
try:  # the CUDA kernel of an op, as CUDA tensors would reach it
    torch.ops.tdpo_ext.token_stats.default.redispatch(
        DispatchKeySet(DispatchKey.CUDA), logits, logits, labels, -100)
except RuntimeError as error:
    print(f"refusal={error}")
'''


def check_import(python, env_dir, cwd):
    """Imports the installed tdpo_ext from cwd (outside the checkout) and checks it: a
    CPU-only build, which computes on the CPU and refuses CUDA with NO_CUDA_KERNELS."""
    output = must_run([python, "-c", IMPORT_CHECK], cwd=cwd)
    facts = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    assert facts.get("file", "").startswith(str(env_dir)), output
    assert facts.get("torch") == torch.__version__, output
    assert facts.get("cuda_kernels") == "False", output
    assert abs(float(facts.get("loss", "nan")) - 0.693147) < 1e-4, output  # log 2
    assert facts.get("refusal") == NO_CUDA_KERNELS, output


def test_without_torch_pip_stops_at_once_with_one_line(work):
    """In an environment without torch, plain `pip install` (isolated) and
    `pip install --no-build-isolation` stop with setup.py's one line, on the machine's pip
    and on the newest, and no torch is downloaded."""
    env_dir = work / "no-torch"
    python = make_venv(env_dir, sees_running_environment=False)
    expected = _read_no_torch_message()
    # So that --no-build-isolation gets as far as setup.py, as with the tools it names.
    must_run([python, "-m", "pip", "install", tool(work, "setuptools"), tool(work, "ninja")],
             cwd=work)
    for newest in (False, True):
        if newest:
            must_run([python, "-m", "pip", "install", tool(work, "pip")], cwd=work)
        version = must_run([python, "-m", "pip", "--version"], cwd=work).split()[1]
        for command in (["install", ".[trl]"], ["wheel", "."],
                        ["install", "--no-build-isolation", "."]):
            status, output = run([python, "-m", "pip", *command], cwd=work / "src", timeout=300)
            what = f"pip {version} {' '.join(command)}"
            assert status != 0, f"{what} succeeded without torch:\n{output}"
            assert expected in (line.strip() for line in output.splitlines()), \
                f"{what}: no one-line explanation:\n{output}"
            assert "torch-" not in output and "Collecting torch" not in output, \
                f"{what} fetched a torch:\n{output}"


@pytest.fixture(scope="module")
def user_env(work):
    """A fresh environment that sees the installed torch, where plain
    `pip install ".[trl]"` (isolated, the machine's pip) has built and installed tdpo-ext."""
    env_dir = work / "user"
    python = make_venv(env_dir, sees_running_environment=True)
    output = must_run([python, "-m", "pip", "install", "-v", ".[trl]"], cwd=work / "src",
                      timeout=1800)
    return python, env_dir, output


def test_pip_install_builds_against_the_installed_torch(user_env, work):
    python, env_dir, output = user_env
    assert "Collecting torch" not in output and "Downloading torch" not in output, output
    check_import(python, env_dir, cwd=work)
    # The refusal's own tests on this CPU-only build (a CUDA build of the checkout skips them).
    must_run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              work / "src" / "tests" / "test_cuda_missing.py"], cwd=work)
    lines = [line.strip() for line in output.splitlines()]
    if torch.version.cuda is not None:
        # The notice is the build's last word: nothing but pip's own lines after it.
        last = max(i for i, line in enumerate(lines) if line.startswith(NOTICE))
        assert lines[last + 1].startswith("Building wheel for tdpo-ext"), lines[last:last + 3]
        notice = lines[last]
        for words in ("The CPU ops work", "nvcc on PATH or set CUDA_HOME", "TDPO_EXT_CUDA=1"):
            assert words in notice, notice


def test_newest_pip_wheel_installs_into_a_fresh_environment(user_env, work):
    """`pip wheel .` on the newest pip builds (isolated) against the installed torch, pins
    that torch release, and the wheel works in another fresh environment."""
    python, _, _ = user_env
    must_run([python, "-m", "pip", "install", tool(work, "pip")], cwd=work)
    dist = work / "dist"
    must_run([python, "-m", "pip", "wheel", "--no-deps", ".", "-w", dist], cwd=work / "src",
             timeout=1800)
    (wheel,) = glob.glob(str(dist / "tdpo_ext-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [line for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist: torch")]
    assert requires == [f"Requires-Dist: torch=={TORCH_RELEASE}"], requires

    fresh_dir = work / "fresh"
    fresh = make_venv(fresh_dir, sees_running_environment=True)
    must_run([fresh, "-m", "pip", "install", wheel], cwd=work)
    check_import(fresh, fresh_dir, cwd=work)


def test_no_build_isolation_builds_too(user_env, work):
    """The command the one-line message gives, with the tools it names installed."""
    python, env_dir, _ = user_env
    must_run([python, "-m", "pip", "install", tool(work, "setuptools"), tool(work, "ninja")],
             cwd=work)
    must_run([python, "-m", "pip", "install", "--no-build-isolation", "."], cwd=work / "src",
             timeout=1800)
    check_import(python, env_dir, cwd=work)
