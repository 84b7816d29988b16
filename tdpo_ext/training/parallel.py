"""How the training loop spreads a model over a torchrun group: DistributedDataParallel
(--parallel ddp: every process holds the whole model and averages gradients) or FSDP2
(--parallel fsdp: torch's fully_shard, each process holding a shard of every parameter,
gradient and AdamW moment, the frozen reference sharded the same way). The loop calls
the few functions here and does not need to know which one it runs under."""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.distributed.tensor import DTensor

from . import models as M
from .processes import Processes


def check(cfg, procs: Processes) -> None:
    """Refuses --parallel fsdp where there is nothing to shard over: a one-process run
    would train unsharded, and its single-file checkpoint could not be resumed by a
    sharded run (nor the reverse), so it is refused rather than quietly changed."""
    if cfg.parallel == "fsdp" and procs.world == 1:
        raise SystemExit("tdpo-train: --parallel fsdp shards the model over the processes "
                         "of a torchrun group; this is one process. Run it under "
                         "`torchrun --nproc_per_node=N`, or drop --parallel fsdp")


def is_sharded(cfg, procs: Processes) -> bool:
    return cfg.parallel == "fsdp" and procs.world > 1


def load_device(cfg, procs: Processes) -> torch.device:
    """Where a stage's models are loaded: a sharded run loads them on the CPU and lets
    fully_shard move each unit to the device as it shards it, so that no device ever
    holds a whole model."""
    return torch.device("cpu") if is_sharded(cfg, procs) else procs.device


def layers_of(model) -> torch.nn.ModuleList:
    """The transformer blocks: the ModuleList holding the most parameters (TinyGPT's
    .blocks, a transformers model's decoder layers), each an FSDP unit of its own so that
    only one block's parameters are gathered at a time."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise SystemExit(f"tdpo-train: --parallel fsdp: found no list of transformer blocks "
                         f"in {type(model).__name__} to shard one by one")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard(model, procs: Processes, param_dtype: torch.dtype | None) -> None:
    """fully_shard each block, then the root (embeddings, final norm and head: tied
    weights must share one FSDP unit, the root's). With param_dtype, each gathered
    parameter is cast to it for the forward and backward (FSDP2's mixed precision, in place
    of autocast), gradients are reduced in float32 and the float32 shards stay the
    masters that AdamW steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # TinyGPT's blocks return their attention keys and values (views) for the sampling
    # cache; nothing modifies them in place, which is what this FSDP2 warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Block|TinyGPT)\) "
                            "returned a view tensor")
    mesh = init_device_mesh(procs.device.type, (procs.world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in layers_of(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def wrap(policy, ref, cfg, procs: Processes):
    """The module the training forward runs through: the policy itself (one process, or
    fsdp: sharded in place, reference too), or a DDP wrapper around it."""
    if procs.world == 1:
        return policy
    if cfg.parallel == "fsdp":
        compute = getattr(torch, cfg.dtype)
        shard(policy, procs, compute if compute != torch.float32 else None)
        if ref is not None:  # held in the compute dtype already: nothing to cast
            shard(ref, procs, None)
        return policy
    device = procs.device
    return torch.nn.parallel.DistributedDataParallel(
        policy, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model, sync: bool):
    """A context in which backward passes reduce gradients over processes only if `sync`:
    the micro-batches before the last one of a step accumulate locally."""
    from torch.distributed.fsdp import FSDPModule
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(module, max_norm: float) -> float:
    """Clips the gradients to max_norm; returns their norm before clipping, over the whole
    model: with sharded (DTensor) gradients torch computes each shard's part and the norm
    comes back as a DTensor whose full value sums the parts over processes."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model) -> dict | None:
    """The model's whole (unsharded) state on CPU: on every process for an unsharded
    model; for a sharded one, gathered to rank 0 (None elsewhere): every process must
    call it."""
    from torch.distributed.fsdp import FSDPModule
    model = M.unwrap(model)
    if not isinstance(model, FSDPModule):
        return model.state_dict()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return state if dist.get_rank() == 0 else None
