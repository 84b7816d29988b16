"""A stage's checkpoint: the whole training state in one file, so that a kill at any
moment leaves either the previous checkpoint or the new one, never a mix. Every process's
RNG state is gathered into it (dropout masks and sampling draw from them), and restored
on resume when the number of processes is the same."""
from __future__ import annotations

import os

import torch

from .files import atomic_write
from .processes import Processes, barrier, gather, log, rng_state, set_rng_state

FILE = "checkpoint.pt"


def save(path: str, state: dict, procs: Processes) -> None:
    """state (rank 0's: model, optimizer, step, ...) plus every process's RNG state."""
    rngs = gather(rng_state())
    if procs.rank == 0:
        with atomic_write(path, "wb") as f:
            torch.save(state | {"rng": rngs, "world_size": procs.world}, f)
    barrier()


def load(path: str, procs: Processes) -> dict | None:
    """The state saved at `path` (None if there is none), this process's RNG restored."""
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["world_size"] == procs.world:
        set_rng_state(state["rng"][procs.rank])
    else:
        log(f"{path}: saved by {state['world_size']} processes, resumed by {procs.world}: "
            "random state not restored")
    return state
