"""The check TDPOTrainer makes of its train and eval datasets before TRL processes them:
preference pairs in one of TRL's four formats (standard or conversational, with an
explicit or an implicit prompt), each bad row refused by a message that names the dataset,
the row and the column, instead of a traceback from inside TRL's dataset preparation."""
from __future__ import annotations

import functools
from typing import Any, Optional

from datasets import Dataset, IterableDataset

COLUMNS = ("prompt", "chosen", "rejected")
_REQUIRED = ("chosen", "rejected")
_BATCH_ROWS = 1000
_FORMATS = ("standard format ('prompt', 'chosen' and 'rejected' strings) or the "
            "conversational format (the same columns as lists of messages, "
            "{'role': ..., 'content': ...}); 'prompt' may be left implicit, as the shared "
            "start of 'chosen' and 'rejected'")
_EXPECTED = {"standard": "a string",
             "conversational": "a non-empty list of messages, each a dict with a string "
                               "'role' and a 'content' (a string, or a list of parts)"}


def check_preference_dataset(dataset, name: str):
    """Raises ValueError, naming the dataset (``name``: "train", "eval", ...), unless
    ``dataset`` holds preference pairs in one format: the format of its first row. Returns
    the dataset; an IterableDataset is checked on its first row here and on every row as it
    streams (a map over it, which TRL's own maps follow), so the stream is not read twice.
    One pass over the columns it reads, in batches, without copying the dataset."""
    if isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"TDPOTrainer: the {name} dataset is empty; expected rows of "
                             f"preference pairs, in the {_FORMATS}")
        check = _row_checker(name, list(first), first)
        return dataset.map(check, batched=True, with_indices=True)
    if not isinstance(dataset, Dataset):
        return dataset  # DPOTrainer refuses it, naming the type
    if len(dataset) == 0:
        raise ValueError(f"TDPOTrainer: the {name} dataset is empty (0 rows); expected rows "
                         f"of preference pairs, in the {_FORMATS}")
    columns = [column for column in COLUMNS if column in dataset.column_names]
    read = dataset.select_columns(columns).with_format(None)  # views, no copy
    check = _row_checker(name, dataset.column_names, read[0])
    for start in range(0, len(read), _BATCH_ROWS):
        batch = read[start:start + _BATCH_ROWS]
        check(batch, range(start, start + len(batch[columns[0]])))
    return dataset


def _row_checker(name: str, column_names, first_row: dict):
    """check(batch, indices), for the format of first_row; refuses a missing column."""
    for column in _REQUIRED:
        if column not in column_names:
            raise ValueError(f"TDPOTrainer: the {name} dataset has no {column!r} column (its "
                             f"columns: {sorted(column_names)}); expected the {_FORMATS}")
    columns = [column for column in COLUMNS if column in column_names]
    decisive = next((c for c in columns if _kind(first_row[c])), None)
    if decisive is None:
        column = columns[0]
        raise ValueError(f"TDPOTrainer: {name} dataset, row 0, column {column!r}: found "
                         f"{_found(first_row[column])}; expected a string or a list of "
                         f"messages, in the {_FORMATS}")
    kind = _kind(first_row[decisive])
    prompt = "an explicit prompt" if "prompt" in columns else "an implicit prompt"
    layout = f"the {kind} format with {prompt}, as row 0's {decisive!r} is"
    return functools.partial(_check_batch, name=name, columns=columns, kind=kind,
                             layout=layout)


def _check_batch(batch: dict, indices, *, name, columns, kind, layout) -> dict:
    for column in columns:
        for row, value in zip(indices, batch[column]):
            if _kind(value) != kind:
                raise ValueError(
                    f"TDPOTrainer: {name} dataset, row {row}, column {column!r}: found "
                    f"{_found(value)}; expected {_EXPECTED[kind]} ({layout}: "
                    f"{', '.join(repr(c) for c in columns)})")
    return {}


def _kind(value: Any) -> Optional[str]:
    """"standard" for a string, "conversational" for a non-empty list of messages, else
    None."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return "conversational"
    return None


def _is_message(message: Any) -> bool:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return False
    content = message.get("content")
    # An assistant turn that only calls tools may have no content.
    return isinstance(content, (str, list)) or (content is None and bool(
        message.get("tool_calls")))


def _found(value: Any) -> str:
    """What a value is, for a message."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return f"a string {value[:40]!r}"
    if isinstance(value, list):
        if not value:
            return "an empty list"
        bad = next((i for i, m in enumerate(value) if not _is_message(m)), None)
        if bad is None:
            return "a list of messages"
        return f"a list whose item {bad} is not a message: {value[bad]!r:.80}"
    return f"{type(value).__name__} {value!r:.40}"
