"""Processes, devices and random state, for the training loop and the experiments built
on it: one process or a torchrun group (DDP), its device, sums across processes, logging
from the first one, and the RNG state a checkpoint saves and restores."""
from __future__ import annotations

import os
import random
from typing import NamedTuple

import torch
import torch.distributed as dist


class Processes(NamedTuple):
    """This process's place in the run: its rank, the number of processes, its device."""
    rank: int
    world: int
    device: torch.device


ONE_CPU_PROCESS = Processes(0, 1, torch.device("cpu"))


def setup_distributed(device_arg: str, threads: int | None = None) -> Processes:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu" and not threads:  # share the cores between local processes
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Processes(rank, world, device)


def log(*args):
    """Prints on the first process only, above any progress bar."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            from tqdm import tqdm
            tqdm.write(" ".join(str(a) for a in args))
        except ImportError:
            print(*args, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """Every process's `obj`, in rank order (on every process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def seed_all(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
