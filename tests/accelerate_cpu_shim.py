"""Lets accelerate start FSDP and DeepSpeed on CPU processes (gloo), for the sharded tests
(test_trl_sharded.py). Written for accelerate 1.16.0, whose AcceleratorState.__init__ keeps
the FSDP plugin only for accelerator devices and starts DeepSpeed only off the CPU: on
MULTI_CPU both silently become DDP. After the original __init__ has set up the CPU process
group, this switches the state to the plugin it was given, as the GPU branches of that
__init__ do; nothing else changes.

    import accelerate_cpu_shim; accelerate_cpu_shim.install()   # before the Trainer

It also keeps DeepSpeed (written for 0.19) from compiling its shared-memory all-reduce
op, a C++ build that its CPU backend starts when it comes up: ZeRO uses gloo without it.
"""
from __future__ import annotations

import functools
import importlib

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

WRITTEN_FOR = "1.16"


def install() -> None:
    if not accelerate.__version__.startswith(WRITTEN_FOR):
        raise RuntimeError(f"accelerate_cpu_shim was written for accelerate {WRITTEN_FOR}, "
                           f"found {accelerate.__version__}: check AcceleratorState.__init__")
    try:  # (deepspeed.comm.torch, as an attribute, is the torch module)
        ds_torch_backend = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        pass
    else:
        ds_torch_backend.build_shm_op = lambda: None
    original = AcceleratorState.__init__
    if getattr(original, "_cpu_shim", False):
        return

    @functools.wraps(original)
    def __init__(self, mixed_precision=None, cpu=False, dynamo_plugin=None,
                 deepspeed_plugin=None, fsdp_plugin=None, *args, **kwargs):
        first = AcceleratorState._shared_state == {}
        original(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin,
                 *args, **kwargs)
        if not first or self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        elif deepspeed_plugin is not None:
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            self._mixed_precision = "no"  # DeepSpeed's config says it, as on GPUs
        else:
            return
        PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._cpu_shim = True
    AcceleratorState.__init__ = __init__
