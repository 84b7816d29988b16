"""CUDA tensors reaching a build without CUDA kernels raise one message that names the
cause and the fix (tdpo_ext.ops.NO_CUDA_KERNELS), from every public function and from
TDPOTrainer's construction, instead of the dispatcher's "Could not run 'tdpo_ext::...'
with arguments from the 'CUDA' backend".

Needs no GPU, and runs on any build: the two inputs of the check are stood in for. A
fresh interpreter loads tdpo_ext._C, makes its built_with_cuda() answer False, then
imports tdpo_ext (which registers the refusals at import); a dispatch mode sends the calls
of tdpo_ext's C++ ops to their CUDA kernels, as CUDA tensors would, while the tensors stay
on the CPU. tests/test_install.py checks the same on a real CPU-only build."""
import subprocess
import sys

import pytest
import torch

import tdpo_ext
from tdpo_ext.ops import NO_CUDA_KERNELS

AS_IF_BUILT_WITHOUT_CUDA = r'''
import glob, importlib.machinery, importlib.util, os, sys
import torch
from torch._C import DispatchKey, DispatchKeySet
from torch.utils._python_dispatch import TorchDispatchMode

# Load the extension module by hand, before the package that imports it, and make it say
# that it has no CUDA kernels.
folder = importlib.util.find_spec("tdpo_ext").submodule_search_locations[0]
(path,) = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
           for p in glob.glob(os.path.join(folder, "_C" + suffix))]
spec = importlib.util.spec_from_file_location("tdpo_ext._C", path)
extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extension)
extension.built_with_cuda = lambda: False
sys.modules["tdpo_ext._C"] = extension

import tdpo_ext
from tdpo_ext.ops import NO_CUDA_KERNELS
assert not tdpo_ext.built_with_cuda()


class AsIfOnCUDA(TorchDispatchMode):
    """Runs tdpo_ext's C++ ops with their CUDA kernels (those with a CPU kernel: the
    fused linear ops are Python, run on, and call the C++ ops in turn)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "tdpo_ext":
            return func(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CPU"):
            return func.redispatch(DispatchKeySet(DispatchKey.CUDA), *args, **kwargs)
        with self:  # so that the C++ ops it calls come back here
            return func.redispatch(DispatchKeySet(DispatchKey.CompositeExplicitAutograd),
                                   *args, **kwargs)


logits = torch.randn(2, 3, 5)
labels = torch.tensor([[1, 2, 3], [4, 0, -100]])
hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
pair = [torch.zeros(1)] * 4
calls = {
    "tdpo_loss": lambda: tdpo_ext.tdpo_loss(logits, logits, labels),
    "sequence_stats": lambda: tdpo_ext.sequence_stats(logits, logits, labels),
    "preference_loss": lambda: tdpo_ext.preference_loss(*pair),
    "fused_linear_sequence_stats":
        lambda: tdpo_ext.fused_linear_sequence_stats(hidden, weight, hidden, weight, labels),
    "fused_linear_tdpo_loss":
        lambda: tdpo_ext.fused_linear_tdpo_loss(hidden, weight, hidden, weight, labels),
}
for name, call in calls.items():
    try:
        with AsIfOnCUDA():
            call()
    except Exception as error:  # the message, whichever exception type carries it
        assert str(error) == NO_CUDA_KERNELS, f"{name}: {type(error).__name__}: {error}"
    else:
        raise AssertionError(f"{name} ran on 'CUDA' in a build without CUDA kernels")
    call()  # on the CPU, the same build still works
print("every public function refused CUDA and ran on the CPU")
'''


def test_public_functions_refuse_cuda_in_a_build_without_cuda_kernels():
    result = subprocess.run([sys.executable, "-c", AS_IF_BUILT_WITHOUT_CUDA],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every public function refused CUDA" in result.stdout


def test_message_names_cause_and_fix():
    assert "without CUDA kernels" in NO_CUDA_KERNELS
    assert "nvcc on PATH or CUDA_HOME" in NO_CUDA_KERNELS
    assert "TDPO_EXT_CUDA=1 pip install ." in NO_CUDA_KERNELS


def test_trainer_refuses_cuda_at_construction(monkeypatch, tmp_path):
    pytest.importorskip("trl")
    from tdpo_ext import ops
    from tdpo_ext.trl import TDPOConfig, TDPOTrainer

    args = TDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    monkeypatch.setattr(ops, "built_with_cuda", lambda: False)
    # args.device is where the Trainer puts the models: cuda:N on a GPU machine.
    monkeypatch.setattr(TDPOConfig, "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(RuntimeError) as raised:
        TDPOTrainer(model="never-loaded", args=args)
    assert str(raised.value) == NO_CUDA_KERNELS


def test_trainer_check_passes_where_kernels_exist():
    from tdpo_ext import ops

    ops.check_device_has_kernels(torch.device("cpu"))
    if tdpo_ext.built_with_cuda():
        ops.check_device_has_kernels(torch.device("cuda", 0))
