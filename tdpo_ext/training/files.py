"""Files that a kill at any moment must not leave half-written: a write that replaces its
target only once complete, and a stage's metrics log, whose rows must match the steps its
checkpoint has taken."""
from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """A file opened for writing beside `path` and renamed over it once the block ends
    (rename is atomic on POSIX), so `path` holds either the old or the new content."""
    tmp = path + ".tmp"
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)


class MetricsLog:
    """A stage's metrics.jsonl: one JSON row per logged step, appended by rank 0."""

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank

    def cut_to(self, step: int | None) -> None:
        """Keeps only the rows up to `step` (none if None): a resumed stage takes the
        steps after its checkpoint again, and one started afresh takes them all, so the
        rows a killed attempt wrote past that point go. A row cut short by a kill is not
        valid JSON; it and anything after it go too."""
        if self.rank != 0 or not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if step is None or row["step"] > step or not line.endswith("\n"):
                    break
                kept.append(line)
        with atomic_write(self.path) as f:
            f.writelines(kept)

    def append(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def read_rows(path: str) -> list[dict]:
    """The rows of a JSONL log that MetricsLog wrote (metrics.jsonl, eval_examples.jsonl)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
