"""A stage's checkpoint: the whole training state, written so that a kill at any moment
leaves either the previous checkpoint or the new one, never a mix. Every process's RNG
state is gathered into it (dropout masks and sampling draw from them), and restored on
resume when the number of processes is the same.

Two forms: one file (FILE) for an unsharded model, which rank 0 holds whole; and, for a
model sharded with FSDP2, a folder (FOLDER) that torch.distributed.checkpoint writes, each
process its own shards, beside rank 0's file of the rest of the state (TRAINING_STATE).
Both hold only plain data (tensors, numbers, strings, lists, tuples, dicts), and are read
back as such: loading a checkpoint runs no code from it (safe_load)."""
from __future__ import annotations

import os
import shutil

import torch

from . import safe_load
from .files import atomic_write
from .processes import Processes, barrier, gather, log, rng_state, set_rng_state

FILE = "checkpoint.pt"
FOLDER = "checkpoint"
TRAINING_STATE = "training_state.pt"


def save(path: str, state: dict, procs: Processes) -> None:
    """state (rank 0's: model, optimizer, step, ...) plus every process's RNG state."""
    rngs = gather(rng_state())
    if procs.rank == 0:
        with atomic_write(path, "wb") as f:
            torch.save(state | {"rng": rngs, "world_size": procs.world}, f)
    barrier()


def load(path: str, procs: Processes) -> dict | None:
    """The state saved at `path` (None if there is none), this process's RNG restored;
    a file holding more than plain data is refused (safe_load)."""
    if not os.path.isfile(path):
        return None
    return _restore_rng(safe_load.torch_file(path), path, procs)


def _restore_rng(state: dict, path: str, procs: Processes) -> dict:
    if state["world_size"] == procs.world:
        set_rng_state(state["rng"][procs.rank])
    else:
        log(f"{path}: saved by {state['world_size']} processes, resumed by {procs.world}: "
            "random state not restored")
    return state


def save_sharded(folder: str, model, optimizer, state: dict, procs: Processes) -> None:
    """The sharded model and optimizer (torch.distributed.checkpoint, every process
    writing its shards) and `state` (rank 0's: step, scheduler, ...) with every process's
    RNG state, written to folder.tmp and renamed to `folder` once complete. A folder
    cannot be renamed over another, so the old one is first moved to folder.old, which
    load_sharded falls back on if a kill comes between the two renames."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, old = folder + ".tmp", folder + ".old"
    if procs.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed attempt's partial write
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    rngs = gather(rng_state())
    if procs.rank == 0:
        torch.save(state | {"rng": rngs, "world_size": procs.world},
                   os.path.join(tmp, TRAINING_STATE))
        if os.path.isdir(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_sharded(folder: str, model, optimizer, procs: Processes) -> dict | None:
    """Loads the model's and optimizer's shards saved by save_sharded into them and returns
    the rest of the state (None if there is no checkpoint), this process's RNG restored.
    Every file is read as plain data, the training state and the shards' metadata checked
    before any shard is loaded (safe_load). (torch.distributed.checkpoint can load onto
    another number of processes; tested here with the same number only.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = next((p for p in (folder, folder + ".old") if os.path.isdir(p)), None)
    if path is None:
        return None
    state = safe_load.torch_file(os.path.join(path, TRAINING_STATE))
    safe_load.check_dcp_metadata(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    shards = {"model": model_state, "optimizer": optim_state}
    # dcp.load fills the tensors of these state dicts in place (the optimizer's are its
    # own moment tensors); set_state_dict applies the rest (learning rates of the groups).
    try:
        dcp.load(shards, checkpoint_id=path, planner=safe_load.weights_only_load_planner(path))
    except dcp.api.CheckpointException as e:
        refused = safe_load.refusal_in(e)
        if refused is None:
            raise
        raise refused from None
    set_state_dict(model, optimizer, model_state_dict=shards["model"],
                   optim_state_dict=shards["optimizer"])
    return _restore_rng(state, path, procs)


def refuse_other_form(folder: str, sharded: bool) -> None:
    """A run checkpointed unsharded cannot continue sharded, nor the reverse: refused
    rather than started over from step 0."""
    other, given, wanted = (FILE, "ddp", "fsdp") if sharded else (FOLDER, "fsdp", "ddp")
    if os.path.exists(os.path.join(folder, other)):
        raise SystemExit(f"tdpo-train: {folder} holds a checkpoint of a --parallel {given} "
                         f"run ({other}); it cannot be resumed with --parallel {wanted}. "
                         f"Resume it with --parallel {given}")
