"""Run by test_trl.py under torchrun: two TDPOTrainer steps (fused LM head) on CPU with
PER_DEVICE pairs per process; each rank saves its final parameters and its logged metrics
(trainer.state.log_history) and its AdamW settings to OUT/rank{r}.pt.

    python -m torch.distributed.run --nproc_per_node=N trl_ddp_run.py OUT PER_DEVICE
"""
import gc
import sys

import torch
import torch.distributed as dist

from tdpo_ext.trl import TDPOTrainer
from trl_setup import adam_settings, make_config, make_dataset, make_tokenizer, models_pair

out, per_device = sys.argv[1], int(sys.argv[2])
# Tied and echoing (make_dataset): a mean_token_accuracy far from 0, as in test_trl.py.
policy, ref = models_pair(move=1.0, tied=True)
args = make_config(out, per_device_train_batch_size=per_device, ddp_backend="gloo")
trainer = TDPOTrainer(model=policy, ref_model=ref, args=args,
                      train_dataset=make_dataset(echo=True), processing_class=make_tokenizer())
trainer.train()
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save({"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "log_history": trainer.state.log_history, "adam": adam_settings(args)},
           f"{out}/rank{rank}.pt")
# Free the wrapped model and its gloo work objects while the interpreter is alive (freed at
# shutdown instead, they can abort the exit), then leave the group.
del trainer
gc.collect()
if dist.is_initialized():
    dist.destroy_process_group()
