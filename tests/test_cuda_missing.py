"""CUDA tensors reaching a build without CUDA kernels raise one message that names the
cause and the fix (tdpo_ext.ops.NO_CUDA_KERNELS): every op has a CUDA implementation that
raises it (csrc/no_cuda_kernels.cpp), so every public function does, compiled or not, and
TDPOTrainer at construction, instead of the dispatcher's "Could not run 'tdpo_ext::...'
with arguments from the 'CUDA' backend".

Needs no GPU: a dispatch mode sends the calls of tdpo_ext's C++ ops to their CUDA
implementations, as CUDA tensors would, while the tensors stay on the CPU. A build with
the CUDA kernels has no refusals and skips those tests. tests/test_install.py checks the
refusal on a CPU-only build installed by pip, tests/cmake_library_check.py on the
CMake-built library."""
import pytest
import torch
from torch._C import DispatchKey, DispatchKeySet
from torch.utils._python_dispatch import TorchDispatchMode

import tdpo_ext
from tdpo_ext.ops import NO_CUDA_KERNELS

without_cuda_kernels = pytest.mark.skipif(
    tdpo_ext.built_with_cuda(), reason="this build has the CUDA kernels, not the refusals")


def has_kernel(op_name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op_name, key)


class DeviceOpsMode(TorchDispatchMode):
    """Hands each call of a C++ op of tdpo_ext (an op with a CPU kernel) to device_op; the
    fused linear ops are Python, run on, and call the C++ ops in turn."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "tdpo_ext":
            return func(*args, **kwargs)
        if has_kernel(func.name(), "CPU"):
            return self.device_op(func, args, kwargs)
        with self:  # so that the C++ ops it calls come back here
            return func.redispatch(DispatchKeySet(DispatchKey.CompositeExplicitAutograd),
                                   *args, **kwargs)


class AsIfOnCUDA(DeviceOpsMode):
    """Runs tdpo_ext's C++ ops with their CUDA implementations."""

    def device_op(self, func, args, kwargs):
        return func.redispatch(DispatchKeySet(DispatchKey.CUDA), *args, **kwargs)


class RecordCalls(DeviceOpsMode):
    """Runs tdpo_ext's C++ ops, keeping the arguments of the first call of each."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def device_op(self, func, args, kwargs):
        self.calls.setdefault(func, (args, kwargs))
        return func(*args, **kwargs)


def make_inputs():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, 3], [4, 0, -100]])
    hidden, weight = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4)
    pair = [torch.zeros(1, requires_grad=True) for _ in range(4)]
    return logits, labels, hidden, weight, pair


def public_calls():
    """{name: call returning a differentiable loss}, one per public function."""
    logits, labels, hidden, weight, pair = make_inputs()
    return {
        "tdpo_loss": lambda: tdpo_ext.tdpo_loss(logits, logits.detach(), labels).loss,
        "sequence_stats": lambda: tdpo_ext.sequence_stats(logits, logits.detach(), labels)[0].sum(),
        "preference_loss": lambda: tdpo_ext.preference_loss(*pair)[0].sum(),
        "fused_linear_sequence_stats": lambda: tdpo_ext.fused_linear_sequence_stats(
            hidden, weight, hidden.detach(), weight, labels)[0].sum(),
        "fused_linear_tdpo_loss": lambda: tdpo_ext.fused_linear_tdpo_loss(
            hidden, weight, hidden.detach(), weight, labels).loss,
    }


def assert_refuses(call, what):
    with pytest.raises(Exception) as raised:  # the message, whichever type carries it
        call()
    assert str(raised.value) == NO_CUDA_KERNELS, f"{what}: {type(raised.value).__name__}: {raised.value}"


@without_cuda_kernels
@pytest.mark.parametrize("name", list(public_calls()))
def test_public_function_refuses_cuda_and_runs_on_cpu(name):
    call = public_calls()[name]
    with AsIfOnCUDA():
        assert_refuses(call, name)
    call().backward()  # on the CPU, the same build still works


@without_cuda_kernels
@pytest.mark.parametrize("name", ["tdpo_loss", "fused_linear_tdpo_loss"])
def test_compiled_function_refuses_cuda(name):
    graphs = []

    def as_if_on_cuda(graph, example_inputs):  # a torch.compile backend
        graphs.append(graph)

        def run(*args):
            with AsIfOnCUDA():
                return graph(*args)
        return run

    torch._dynamo.reset()
    assert_refuses(torch.compile(public_calls()[name], backend=as_if_on_cuda, fullgraph=True),
                   name)
    (graph,) = graphs  # one graph, which calls tdpo_ext's ops
    assert any(str(node.target).startswith("tdpo_ext.") for node in graph.graph.nodes), graph


@without_cuda_kernels
def test_every_op_refuses_cuda_called_directly():
    recorder = RecordCalls()
    with recorder:
        for call in public_calls().values():
            call().backward()  # the backward ops too
    device_ops = {name for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                  if name.startswith("tdpo_ext::")}
    assert {op.name() for op in recorder.calls} == device_ops  # each op is called below
    for op, (args, kwargs) in recorder.calls.items():
        assert has_kernel(op.name(), "CUDA"), op.name()
        assert_refuses(lambda: op.redispatch(DispatchKeySet(DispatchKey.CUDA), *args, **kwargs),
                       op.name())


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
