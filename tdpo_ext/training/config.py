"""tdpo-train's settings: one dataclass holding every setting and its default, the task
presets applied over it, and the command line generated from its fields (so `--help` shows
each real default, and a misspelt setting fails where it is written)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

from . import ASSETS_DIR, run_folder, safe_load, schema
from .models import TINY_CONFIG_FILE
from .tasks import TASKS


def setting(default, help: str, *, choices=None, default_help: str | None = None):
    """A Config field with its command-line help; default_help describes a None default
    that is worked out at run time."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "default_help": default_help})


@dataclass(frozen=True)
class Config:
    task: typing.Optional[str] = setting(
        None, "task with a reward function; with --data, it only scores samples",
        choices=[*TASKS, "none"], default_help="sentiment without --data, none with it")
    loss: str = setting("tdpo2", "objective", choices=["tdpo1", "tdpo2", "dpo", "sft"])
    beta: float = setting(0.1, "temperature of the preference loss")
    alpha: float = setting(0.5, "TDPO2's weight of the KL term")
    lr: float = setting(5e-6, "learning rate (AdamW)")
    warmup_steps: int = setting(10, "steps of linear learning-rate warm-up")
    steps: typing.Optional[int] = setting(None, "optimizer steps (overrides --epochs)",
                                          default_help="from --epochs")
    epochs: float = setting(1.0, "passes over the training pairs")
    batch_size: int = setting(32, "pairs per optimizer step, over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step and process")
    max_length: int = setting(512, "tokens of prompt + response at most")
    max_prompt_length: int = setting(256, "prompt tokens kept when a pair is too long")
    truncation_mode: str = setting("keep_end", "which end of a long prompt is kept",
                                   choices=["keep_end", "keep_start"])
    average_log_prob: bool = setting(False, "average log-probabilities over a response's "
                                     "tokens instead of summing them")
    seed: int = setting(0, "seed of the initialization, data order and sampling")
    model: str = setting("tiny", "tiny | smollm2 | a folder (transformers causal LM or a "
                         "tiny checkpoint)")
    ref_model: typing.Optional[str] = setting(
        None, "reference model", default_help="a frozen copy of the starting policy")
    chat_template: typing.Optional[bool] = setting(
        None, "wrap prompts in the tokenizer's chat template", default_help="on for smollm2")
    data: typing.Optional[str] = setting(None, "training pairs, JSONL {prompt, chosen, "
                                         "rejected}", default_help="pairs that the task samples")
    eval_data: typing.Optional[str] = setting(
        None, "eval pairs", default_help="the task's, or the last --eval-data-size pairs of "
        "--data held out")
    eval_data_size: int = setting(256, "at most this many eval pairs")
    eval_every: int = setting(100, "steps between evaluations")
    stop_sample_kl: typing.Optional[float] = setting(
        None, "end preference training early, after an evaluation whose sequential KL on "
        "the task's policy samples (sample_kl/eval) exceeds this many nats",
        default_help="never")
    save_every: typing.Optional[int] = setting(None, "steps between checkpoints",
                                               default_help="--eval-every")
    loss_impl: str = setting("fused", "the fused ops, or the reference code's pattern",
                             choices=["fused", "reference"])
    fused_linear: bool = setting(
        False, "compute the loss from the body's hidden states and the LM-head weight "
        "(fused_linear_tdpo_loss), never materializing logits; transformers models whose "
        "head tdpo_ext.lm_head.lm_head_of can fuse; under torchrun too")
    parallel: str = setting(
        "ddp", "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: "
        "the policy and reference sharded over the processes, each transformer block a "
        "unit; sharded checkpoints; needs more than one process)", choices=["ddp", "fsdp"])
    out: typing.Optional[str] = setting(None, "output folder", default_help="runs/<timestamp>")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = setting("float32", "compute dtype: bfloat16 and float16 are mixed precision "
                         "(float32 master weights and AdamW state, forward passes under "
                         "autocast, a loss scaler for float16; the reference is held in it); "
                         "final/ is saved in it", choices=["float32", "bfloat16",
                                                                "float16"])
    threads: typing.Optional[int] = setting(
        None, "torch CPU threads", default_help="1 for the tiny model, whose matrices are "
        "too small to gain from more; torch's default otherwise")
    max_grad_norm: float = setting(10.0, "gradient clipping")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    plots: bool = setting(True, "write loss.png, rewards.png, kl.png, entropy.png")
    # The task pipeline: SFT stage, pair sampling, reward eval.
    sft_steps: int = setting(250, "SFT steps on the task's corpus")
    sft_lr: float = setting(2e-3, "SFT learning rate")
    sft_batch_size: int = setting(32, "SFT texts per step")
    pair_prompts: int = setting(0, "prompts sampled twice to make pairs")
    eval_prompts: int = setting(64, "prompts for the task-reward eval")
    max_new_tokens: int = setting(64, "tokens sampled per response at most")
    temperature: float = setting(1.0, "sampling temperature")
    top_k: int = setting(0, "sample from the k likeliest tokens (0: all)")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


PIPELINE_FIELDS = ("sft_steps", "sft_lr", "sft_batch_size", "pair_prompts", "eval_prompts",
                   "max_new_tokens", "temperature", "top_k")
SHIPPED_PAIRS = {split: os.path.join(ASSETS_DIR, f"movie_reviews_pairs_{split}.jsonl")
                 for split in ("train", "eval")}


def _preset(task: str) -> dict:
    return TASKS[task].preset if task != "none" else {}


def _shown(value) -> str:
    return value if isinstance(value, str) else repr(value)


def _kind(name: str) -> tuple[type, bool]:
    """(the type of a Config field, whether it may be None)."""
    hint = typing.get_type_hints(Config)[name]
    if typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)[0], True
    return hint, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Options generated from Config's fields. Options not given are absent from the parsed
    namespace (SUPPRESS), so that resolve() knows what the user set."""
    p = argparse.ArgumentParser(prog="tdpo-train", formatter_class=argparse.RawTextHelpFormatter,
                                description="TDPO1 / TDPO2 / DPO (or SFT) fine-tuning of a "
                                "causal LM on preference pairs (docs/TRAINING.md).")
    pipeline = p.add_argument_group("task pipeline (SFT stage, pair sampling, reward eval)")
    for f in dataclasses.fields(Config):
        kind, _ = _kind(f.name)
        shown = f.metadata["default_help"] or _shown(f.default)
        presets = ", ".join(f"{t} task: {_shown(TASKS[t].preset[f.name])}" for t in TASKS
                            if f.name in TASKS[t].preset)
        help_text = f"{f.metadata['help']}\n(default: {shown}" + \
            (f"; {presets})" if presets else ")")
        group = pipeline if f.name in PIPELINE_FIELDS else p
        flag = _flag(f.name)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=f.metadata["choices"],
                               default=argparse.SUPPRESS, help=help_text)
    p.add_argument("--resume", metavar="DIR", default=argparse.SUPPRESS,
                   help="continue the run in DIR from its last checkpoint, with its "
                   "config.json\n(flags given with it override that config)")
    return p


def _is_tiny(model: str) -> bool:
    return model == "tiny" or os.path.isfile(os.path.join(model, TINY_CONFIG_FILE))


def resolve(given: dict) -> Config:
    """The settings of a new run: Config's defaults, then the task's preset, then the
    options `given` on the command line; None defaults worked out."""
    if not given.get("data") and not given.get("task") and not _is_tiny(
            given.get("model", "tiny")):
        model = given["model"]
        raise SystemExit(
            f"tdpo-train: --model {model} without --data would run the embedded task, "
            f"whose first stage fine-tunes the model for 250 steps on the tiny model's review "
            f"corpus (about an hour for SmolLM2 on 2 CPU cores). For a quick run on the "
            f"movie-review pairs that tdpo-ext ships (a few minutes):\n"
            f"  tdpo-train --model {model} --task movie-reviews --data "
            f"{SHIPPED_PAIRS['train']} --eval-data {SHIPPED_PAIRS['eval']} --steps 2\n"
            f"or give your own --data, or --task movie-reviews to sample new pairs first.")
    task = given.get("task") or ("none" if given.get("data") else "sentiment")
    if task == "none" and not given.get("data"):
        raise SystemExit("tdpo-train: --task none trains on your pairs: give --data FILE.jsonl")
    cfg = Config().replace(**_preset(task)).replace(**(given | {"task": task}))
    if cfg.threads is None and "OMP_NUM_THREADS" not in os.environ and _is_tiny(cfg.model):
        cfg = cfg.replace(threads=1)
    if cfg.save_every is None:
        cfg = cfg.replace(save_every=cfg.eval_every)
    if cfg.loss == "sft" and cfg.task != "none" and not cfg.data:
        raise SystemExit("tdpo-train: --loss sft with a task pipeline makes no sense; "
                         "give --data or a preference loss")
    return cfg


def resumed(folder: str, given: dict) -> Config:
    """The settings of the run in `folder` (its config.json), with the options `given`
    again overriding them, each with a notice. The folder is checked first (run_folder),
    and each setting in its config.json is parsed as its flag would be."""
    run_folder.refuse_unsafe_entries(folder)
    cfg = Config(**_parsed_settings(os.path.join(folder, "config.json")))
    for name, value in given.items():
        if name != "out" and getattr(cfg, name) != value:
            print(f"tdpo-train: --resume: overriding {name}={getattr(cfg, name)!r} with "
                  f"{value!r}")
            cfg = cfg.replace(**{name: value})
    return cfg.replace(out=folder)


def _parsed_settings(path: str) -> dict:
    """The settings of the config.json at `path` (which also records the command line and
    torch), each value of the JSON type of its Config field and then parsed by that
    field's flag (its type and choices): what the command line would refuse is refused."""
    saved = safe_load.json_file(path, schema.MapOf(str, object))
    parser, argv, settings = build_parser(), [], {}
    parser.exit_on_error = False
    for f in dataclasses.fields(Config):
        if f.name not in saved:
            continue
        kind, optional = _kind(f.name)
        value = saved[f.name]
        safe_load.check(value, schema.AnyOf(kind, type(None)) if optional else kind, path,
                        f"its {f.name}")
        if value is None:
            settings[f.name] = None
        elif kind is bool:
            argv.append(_flag(f.name if value else "no_" + f.name))
        else:
            argv.append(f"{_flag(f.name)}={value}")
    try:
        return settings | vars(parser.parse_args(argv))
    except argparse.ArgumentError as e:
        raise safe_load.refusal(path, f"its {e}") from None


def from_command_line(argv=None) -> tuple[Config, bool]:
    """(settings, whether they resume an earlier run) of a tdpo-train command line."""
    given = vars(build_parser().parse_args(argv))
    folder = given.pop("resume", None)
    if folder is not None:
        return resumed(folder, given), True
    return resolve(given), False
