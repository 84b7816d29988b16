"""tdpo-trl (also ``python -m tdpo_ext.trl``): TDPO from TRL's command line, as TRL's
trl/scripts/dpo.py runs DPO: TRL's TrlParser over ScriptArguments, TDPOConfig (every
DPOConfig field, and TDPO's), ModelConfig and DatasetMixtureConfig; ``--config recipe.yaml``
sets any of them, and flags given beside it win.

    tdpo-trl --model_name_or_path Qwen/Qwen2-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --output_dir Qwen2-0.5B-TDPO \\
        --loss_type tdpo2 --beta 0.1 --tdpo_alpha 0.5 --use_peft --lora_r 32
    accelerate launch -m tdpo_ext.trl --config examples/trl_tdpo.yaml   # or torchrun -m

``--dataset_name`` is a hub dataset, a local folder (its files named by split, e.g.
train.jsonl and test.jsonl) or a local data file (.jsonl, .json, .csv, .parquet: one
"train" split); ``--dataset_train_split`` and ``--dataset_test_split`` pick the splits (the
test split only when evaluating). The model, a reference copy of it (none with
``--use_peft``: the adapters are disabled instead) and the tokenizer are loaded from
``--model_name_or_path``; the result is saved to ``--output_dir`` as DPOTrainer saves it."""
from __future__ import annotations

import os

from .trainer import TDPOConfig, TDPOTrainer


def make_parser(prog: str = "tdpo-trl"):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, TDPOConfig, ModelConfig, DatasetMixtureConfig),
                     prog=prog, description=__doc__.split("\n\n")[0])


def load_preference_dataset(script_args):
    """--dataset_name through datasets.load_dataset: a hub name, a folder, or one file."""
    from datasets import load_dataset
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    name = script_args.dataset_name
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in _EXTENSION_TO_MODULE:
            raise ValueError(f"--dataset_name {name}: a file of an unknown type (known: "
                             f"{', '.join(sorted(_EXTENSION_TO_MODULE))})")
        module, _ = _EXTENSION_TO_MODULE[extension]
        return load_dataset(module, data_files=name, streaming=script_args.dataset_streaming)
    return load_dataset(name, name=script_args.dataset_config,
                        streaming=script_args.dataset_streaming)


def _split(dataset, split: str, flag: str, source: str):
    if split not in dataset:
        raise ValueError(f"{flag} {split!r}: {source} has no such split (its splits: "
                         f"{sorted(dataset)})")
    return dataset[split]


def main(script_args, training_args, model_args, dataset_args) -> None:
    """trl/scripts/dpo.py's main, with TDPOTrainer and local dataset files."""
    import transformers
    from packaging.version import Version
    from trl import get_dataset, get_peft_config, get_quantization_config

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if dataset_args.datasets:  # a mixture from the config file, as in TRL's scripts
        dataset, source = get_dataset(dataset_args), "the dataset mixture"
    elif script_args.dataset_name:
        dataset = load_preference_dataset(script_args)
        source = f"--dataset_name {script_args.dataset_name}"
    else:
        raise ValueError("give --dataset_name (a hub dataset, a local folder or file) or a "
                         "`datasets` mixture in the --config file")
    train = _split(dataset, script_args.dataset_train_split, "--dataset_train_split", source)
    evaluate = (_split(dataset, script_args.dataset_test_split, "--dataset_test_split", source)
                if training_args.eval_strategy != "no" else None)

    trainer = TDPOTrainer(
        model=model_args.model_name_or_path, args=training_args, train_dataset=train,
        eval_dataset=evaluate, quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args))
    if script_args.ignore_bias_buffers:  # TRL's DDP workaround for boolean buffers
        import torch
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool]

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finishes the trackers and leaves the process group


def cli(argv=None) -> None:
    """The tdpo-trl console script."""
    main(*make_parser().parse_args_and_config(argv))
