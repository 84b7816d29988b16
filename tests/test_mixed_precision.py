"""--dtype bfloat16 / float16 is mixed precision: float32 master weights and AdamW state,
forward passes under autocast (FSDP2: its MixedPrecisionPolicy), a loss scaler for
float16. At DPO's learning rates a step moves nearly every weight, as in float32; AdamW on
bfloat16 weights themselves would round almost every update away."""
import os

import pytest
import torch
from training_runs import pairs, tdpo_train, torchrun_2

from tdpo_ext.training import models as M

assert pairs  # a fixture


def masters(out):
    """The float32 weights of a run's checkpoint (a sharded one gathered into one file)."""
    sharded = os.path.join(out, "checkpoint")
    if os.path.isdir(sharded):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(sharded, os.path.join(out, "gathered.pt"))
        return torch.load(os.path.join(out, "gathered.pt"), weights_only=True)["model"]
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


@pytest.mark.parametrize("parallel", ["one_process", "fsdp"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_moves_weights_as_float32(tmp_path, pairs, dtype, parallel):
    """In one process by autocast; under FSDP2 (two processes) by its
    MixedPrecisionPolicy, which casts every gathered weight (LayerNorm's too)."""
    common = ["--data", pairs, "--eval-data", pairs, "--task", "none", "--steps", "2",
              "--batch-size", "8", "--eval-every", "2", "--lr", "5e-7", "--warmup-steps", "0",
              "--no-plots"]
    tdpo_train(*common, "--out", tmp_path / "float32")
    if parallel == "fsdp":
        torchrun_2("-m", "tdpo_ext.training.train", *common, "--parallel", "fsdp",
                   "--dtype", dtype, "--out", tmp_path / dtype)
    else:
        tdpo_train(*common, "--dtype", dtype, "--out", tmp_path / dtype)
    start = M.load_model("tiny", seed=0)[0].state_dict()
    full, mixed = masters(tmp_path / "float32"), masters(tmp_path / dtype)
    assert all(mixed[name].dtype == torch.float32 for name in start)  # float32 masters
    d_full = torch.cat([(full[n] - w).flatten() for n, w in start.items()])
    d_mixed = torch.cat([(mixed[n] - w).flatten() for n, w in start.items()])
    # AdamW's first steps are about lr * sign(gradient): the same moves as in float32, but
    # where compute rounding flips the sign of a gradient near 0 (measured: 0.3% of the
    # weights, 6% of the update's norm in bfloat16; AdamW on bfloat16 weights: 3200%).
    assert (d_mixed != 0).sum() >= 0.98 * (d_full != 0).sum()
    assert (d_mixed.sign() == d_full.sign()).float().mean() > 0.98
    assert (d_mixed - d_full).norm() <= 0.2 * d_full.norm()
    final = torch.load(tmp_path / dtype / "final" / "model.pt", weights_only=True)
    assert all(v.dtype == getattr(torch, dtype) for v in final.values()
               if v.is_floating_point())
