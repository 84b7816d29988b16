"""Run by test_trl_sharded.py: TDPOTrainer with the fused LM head (the default) in each
configuration of CONFIGURATIONS, a few steps on a global batch of 4 pairs, either as one
plain process (the baseline) or under `accelerate launch` as 2 CPU processes (gloo) with
the FSDP2 or DeepSpeed ZeRO-3 config of examples/, made to shard on CPU by
accelerate_cpu_shim:

    python trl_sharded_run.py OUT one_process
    accelerate launch --config_file ../examples/accelerate_fsdp2.yaml --num_processes 2 \
        --mixed_precision no trl_sharded_run.py OUT fsdp2          # or zero3

For each configuration, rank 0 writes OUT/<name>.pt: the logged losses, the evaluation
loss, every parameter gathered whole, how the models were sharded and AdamW's settings;
every rank has asserted that the strategy is the one named (without the shim, accelerate
1.16 would have run DDP) and that the models really are sharded. The parameters as
trainer.save_model() writes them are in OUT/<name>/.
"""
import gc
import os
import sys

import peft
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import accelerate_cpu_shim
from tdpo_ext.trl import TDPOTrainer
from trl_setup import adam_settings, make_config, make_dataset, make_tokenizer, models_pair

GLOBAL_BATCH = 4
# Hidden size 64: the LM heads (2048 x 64) are above ZeRO-3's default
# stage3_param_persistence_threshold (1e5 elements), under which it never partitions.
HIDDEN = 64
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
# name -> (TDPOTrainer arguments beyond the models', whether the policy's head is tied,
# whether there is a separate reference model).
CONFIGURATIONS = {
    # TRL's default gradient checkpointing, and evaluation.
    "ref_untied_checkpointing": (dict(gradient_checkpointing=True, evaluate=True), False, True),
    "ref_tied": (dict(), True, True),
    # The reference is the policy with its adapters disabled.
    "lora_no_ref": (dict(peft=True, gradient_checkpointing=True, learning_rate=1e-2),
                    False, False),
    # TR-DPO: the reference moves halfway to the policy after each step.
    "sync_ref_model": (dict(sync_ref_model=True, ref_model_sync_steps=1,
                            ref_model_mixup_alpha=0.5, max_steps=3), False, True),
}


def strategy(trainer) -> str:
    if trainer.is_fsdp_enabled:
        return "fsdp2" if trainer.accelerator.is_fsdp2 else "fsdp1"
    if trainer.is_deepspeed_enabled:
        return f"zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if dist.is_initialized() else "one_process"


def unwrapped(model):
    return getattr(model, "module", model)  # a DeepSpeed engine holds its model


def sharding(trainer) -> dict:
    """How each model's parameters are held on this rank; raises AssertionError unless
    they really are sharded: FSDP2's DTensors, ZeRO-3's partitions (empty local tensors,
    a slice of each in ds_tensor)."""
    how = strategy(trainer)
    found = {"strategy": how}
    models = {"policy": trainer.model}
    if trainer.ref_model is not None:
        models["ref"] = trainer.ref_model
    for role, model in models.items():
        model = unwrapped(model)
        params = dict(model.named_parameters())
        head = model.get_output_embeddings().weight
        if how == "fsdp2":
            sharded = [n for n, p in params.items() if isinstance(p, DTensor)]
            assert len(sharded) == len(params), f"{role}: {set(params) - set(sharded)} not DTensors"
            local, whole = head.to_local().numel(), head.numel()
        elif how == "zero3":
            sharded = [n for n, p in params.items()
                       if p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0]
            world = dist.get_world_size()
            assert head.numel() == 0 and head.ds_tensor.numel() * world == head.ds_numel, role
            local, whole = head.ds_tensor.numel(), head.ds_numel
        else:
            raise AssertionError(f"{role}: not sharded, the strategy is {how}")
        # Elements of the LM head's weight held on this rank, and in all.
        found[role] = {"sharded": len(sharded), "params": len(params),
                       "head_local": local, "head": whole}
    return found


def gathered(trainer) -> dict:
    """Every parameter of the policy, whole (a collective: every rank calls it)."""
    model = unwrapped(trainer.model)
    params = dict(model.named_parameters())
    if strategy(trainer) == "zero3":
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in params.items()}


def run(out: str, name: str, expected: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    settings, tied, separate_ref = CONFIGURATIONS[name]
    settings = dict(settings)
    use_peft, evaluate = settings.pop("peft", False), settings.pop("evaluate", False)
    policy, ref = models_pair(move=1.0, tied=tied, hidden=HIDDEN)
    args = make_config(f"{out}/{name}", per_device_train_batch_size=GLOBAL_BATCH // world,
                       per_device_eval_batch_size=GLOBAL_BATCH // world,
                       ddp_backend="gloo" if world > 1 else None, **settings)
    trainer = TDPOTrainer(
        model=policy, ref_model=ref if separate_ref else None, args=args,
        train_dataset=make_dataset(), eval_dataset=make_dataset(4, seed=3),
        processing_class=make_tokenizer(),
        peft_config=peft.LoraConfig(**LORA) if use_peft else None)
    trainer.train()
    assert strategy(trainer) == expected, f"ran {strategy(trainer)}, not {expected}"
    steps = [h for h in trainer.state.log_history if "loss" in h]
    result = {"losses": [h["loss"] for h in steps], "first_step": steps[0],
              "sharding": sharding(trainer) if world > 1 else None,
              "adam": adam_settings(args)}
    if evaluate:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
    result["params"] = gathered(trainer)
    trainer.save_model(f"{out}/{name}")
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(result, f"{out}/{name}.pt")
    # Free the models and their process-group work while the interpreter is alive.
    del trainer
    gc.collect()


def main() -> None:
    out, expected = sys.argv[1:]
    accelerate_cpu_shim.install()
    for name in CONFIGURATIONS:
        run(out, name, expected)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
