"""A stage's checkpoint: the whole training state, written so that a kill at any moment
leaves either the previous checkpoint or the new one, never a mix. Every process's RNG
state is gathered into it (dropout masks and sampling draw from them), and restored on
resume when the number of processes is the same.

Two forms: one file (FILE) for an unsharded model, which rank 0 holds whole; and, for a
model sharded with FSDP2, a folder (FOLDER) that torch.distributed.checkpoint writes, each
process its own shards, beside rank 0's file of the rest of the state (TRAINING_STATE).
Both hold only plain data (tensors, numbers, strings, lists, tuples, dicts), and are read
back as such, checked against the shape written here (state_shape) before any of it is
used: loading a checkpoint runs no code from it (safe_load), and a checkpoint that does
not fit the run is refused, never taken for "no checkpoint"."""
from __future__ import annotations

import os
import shutil

import torch

from . import safe_load, schema
from .files import atomic_write
from .processes import Processes, barrier, gather, log, rng_state, set_rng_state

FILE = "checkpoint.pt"
FOLDER = "checkpoint"
TRAINING_STATE = "training_state.pt"

# What rng_state() holds: Python's (a version, a tuple of ints, a float or None), torch's
# CPU generator and the CUDA generators, if any.
RNG = {"python": schema.ListOf(schema.AnyOf(int, float, type(None), schema.ListOf(int))),
       "torch": torch.Tensor, "cuda": schema.AnyOf(type(None), schema.ListOf(torch.Tensor))}
METRICS = schema.MapOf(str, float)


def state_shape(scheduler, scaler, optimizer=None) -> dict:
    """The shape of the state that a stage with this scheduler and loss scaler saves
    (with `optimizer`: the unsharded form, which also holds the model and optimizer);
    their own state dicts give theirs."""
    shape = {"step": int, "scheduler": schema.like(scheduler.state_dict()),
             "scaler": schema.like(scaler.state_dict()), "first_eval": METRICS,
             "last_eval": METRICS, "last_train": METRICS, "rng": schema.ListOf(RNG),
             "world_size": int}
    if optimizer is not None:
        shape |= {"model": schema.MapOf(str, torch.Tensor), "optimizer": {
            "state": schema.MapOf(int, schema.MapOf(str, torch.Tensor)),
            "param_groups": schema.like(optimizer.state_dict()["param_groups"])}}
    return shape


def save(path: str, state: dict, procs: Processes) -> None:
    """state (rank 0's: model, optimizer, step, ...) plus every process's RNG state."""
    rngs = gather(rng_state())
    if procs.rank == 0:
        with atomic_write(path, "wb") as f:
            torch.save(state | {"rng": rngs, "world_size": procs.world}, f)
    barrier()


def load(path: str, procs: Processes, shape: dict) -> dict | None:
    """The state saved at `path` (None if nothing is there), of `shape` (state_shape),
    this process's RNG restored; anything else at `path` (more than plain data, a folder,
    a link) is refused (safe_load)."""
    if not os.path.lexists(path):
        return None
    return _restore_rng(safe_load.torch_file(path, shape), path, procs)


def _restore_rng(state: dict, path: str, procs: Processes) -> dict:
    if state["world_size"] != len(state["rng"]) or state["step"] < 0:
        raise safe_load.refusal(path, f"it holds {len(state['rng'])} random states for "
                                f"{state['world_size']} processes, at step {state['step']}")
    if state["world_size"] == procs.world:
        try:
            set_rng_state(state["rng"][procs.rank])
        except (RuntimeError, ValueError, TypeError) as e:  # a state of another generator
            raise safe_load.refusal(path, f"its random state is not one ({e})") from None
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


def load_sharded(folder: str, model, optimizer, procs: Processes,
                 shape: dict) -> dict | None:
    """Loads the model's and optimizer's shards saved by save_sharded into them and returns
    the rest of the state, of `shape` (None if there is no checkpoint), this process's RNG
    restored. Every file is read as plain data through safe_load, the training state and
    the shards' metadata checked before any shard is loaded. (torch.distributed.checkpoint
    can load onto another number of processes; tested here with the same number only.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = next((p for p in (folder, folder + ".old") if os.path.lexists(p)), None)
    if path is None:
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        raise safe_load.refusal(path, "it is not a folder (a sharded checkpoint is one)")
    state = safe_load.torch_file(os.path.join(path, TRAINING_STATE), shape)
    model_state, optim_state = get_state_dict(model, optimizer)
    groups = schema.like(optim_state["param_groups"])
    shards = {"model": model_state, "optimizer": optim_state}
    # dcp.load fills the tensors of these state dicts in place (the optimizer's are its
    # own moment tensors); set_state_dict applies the rest (learning rates of the groups).
    try:
        dcp.load(shards, storage_reader=safe_load.dcp_reader(path))
    except dcp.api.CheckpointException as e:
        refused = safe_load.refusal_in(e)
        if refused is None:
            raise
        raise refused from None
    safe_load.check(shards["optimizer"]["param_groups"], groups, path,
                    "its optimizer's param_groups")
    try:
        set_state_dict(model, optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise safe_load.refusal(path, f"it does not fit this run's optimizer ({e})") from None
    return _restore_rng(state, path, procs)


def check_optimizer_state(optimizer, saved: dict, path: str) -> None:
    """Refuses an optimizer state (of the unsharded form) whose moments do not fit the
    optimizer's parameters, which AdamW's step would fail on later."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in saved["state"].items():
        if not 0 <= index < len(params):
            raise safe_load.refusal(path, f"its optimizer state names parameter {index} "
                                    f"of {len(params)}")
        for name, tensor in entries.items():
            if tensor.dim() and tensor.shape != params[index].shape:
                raise safe_load.refusal(path, f"its optimizer state {name} of parameter "
                                        f"{index} has shape {tuple(tensor.shape)}, not "
                                        f"{tuple(params[index].shape)}")


def refuse_other_form(folder: str, sharded: bool) -> None:
    """A run checkpointed unsharded cannot continue sharded, nor the reverse: refused
    rather than started over from step 0."""
    other, given, wanted = (FILE, "ddp", "fsdp") if sharded else (FOLDER, "fsdp", "ddp")
    if os.path.exists(os.path.join(folder, other)):
        raise SystemExit(f"tdpo-train: {folder} holds a checkpoint of a --parallel {given} "
                         f"run ({other}); it cannot be resumed with --parallel {wanted}. "
                         f"Resume it with --parallel {given}")
