"""The GPU verification in scripts/gpu/ stays runnable between the rare GPU sessions:
the shell scripts parse, and without a GPU each script says so and exits 2 (the
exit status it documents) instead of failing on a moved path or a renamed import."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "scripts", "gpu")
no_gpu_here = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or torch.cuda.is_available(),
    reason="a GPU machine: scripts/gpu/gpu_check.sh is the check there")


def run(cmd, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kwargs)


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(GPU, "*.sh"))),
                         ids=os.path.basename)
def test_shell_scripts_parse(script):
    result = run(["bash", "-n", script])
    assert result.returncode == 0, result.stderr


@no_gpu_here
@pytest.mark.parametrize("script", ["gpu_check.sh", "trl_step.sh"])
def test_gpu_script_without_gpu_writes_why(script, tmp_path):
    result = run(["bash", os.path.join(GPU, script), str(tmp_path)])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SKIPPED: no GPU" in (tmp_path / "summary.md").read_text()


@no_gpu_here
@pytest.mark.parametrize("script,args", [("sanitizer_case.py", []),
                                         ("profile_case.py", ["8x16x32:float32"]),
                                         ("metrics_overhead.py", [])])
def test_python_cases_without_gpu_exit_2(script, args):
    result = run([sys.executable, os.path.join(GPU, script), *args])
    assert result.returncode == 2, result.stdout + result.stderr


@no_gpu_here
@pytest.mark.parametrize("bench", [
    "bench_ops.py", "bench_fused_linear.py",
    pytest.param("bench_trl_step.py", marks=pytest.mark.skipif(
        importlib.util.find_spec("trl") is None, reason="trl is not installed"))])
def test_cuda_benchmarks_without_gpu_say_so(bench):
    args = ["--random-init"] if bench == "bench_trl_step.py" else []
    result = run([sys.executable, os.path.join(ROOT, "bench", bench), "--device", "cuda", *args])
    assert result.returncode != 0
    assert "--device cuda needs a GPU" in result.stderr, result.stderr
