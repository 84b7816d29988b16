"""The CUDA build is not silently CPU-only: where torch has CUDA, a toolkit is found and
TDPO_EXT_CUDA does not turn CUDA off, setup.py builds the CUDA kernels, so the installed
extension must report them and every op must have a CUDA kernel registered. Needs no
GPU: registration happens when the library loads."""
import os
import shutil

import pytest
import torch

import tdpo_ext

OPS = ("token_stats", "token_stats_tile", "token_stats_finish", "token_stats_backward",
       "preference_loss", "preference_loss_backward")


def _cuda_build_expected():
    """(expected?, why not) with the conditions setup.py uses to build CUDA."""
    if os.environ.get("TDPO_EXT_CUDA", "").strip().lower() in ("0", "false", "off", "no"):
        return False, "TDPO_EXT_CUDA turns the CUDA build off"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return False, "no nvcc on PATH and no CUDA_HOME"
    return True, ""


_EXPECTED, _WHY_NOT = _cuda_build_expected()
pytestmark = pytest.mark.skipif(not _EXPECTED, reason=f"no CUDA build expected: {_WHY_NOT}")


def test_built_with_cuda():
    assert tdpo_ext.built_with_cuda(), (
        "torch has CUDA and a toolkit is present, but tdpo_ext was built without CUDA "
        "kernels; rebuild with TDPO_EXT_CUDA=1 to see why")
    assert torch.ops.tdpo_ext.built_with_cuda()


@pytest.mark.parametrize("op", OPS)
def test_op_has_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tdpo_ext::{op}", "CUDA"), (
        f"tdpo_ext::{op} has no CUDA kernel registered")
