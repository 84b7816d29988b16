"""Files that a kill at any moment must not leave half-written: a write that replaces its
target only once complete, and a stage's metrics log, whose rows must match the steps its
checkpoint has taken."""
from __future__ import annotations

import contextlib
import json
import os
import stat

from .safe_load import open_file, refusal


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """A file opened for writing beside `path` and renamed over it once the block ends
    (rename is atomic on POSIX, and replaces the name `path`, never a file a link at
    `path` points to), so `path` holds either the old or the new content. The file is
    created anew (O_EXCL, O_NOFOLLOW): a killed attempt's leftover is removed first, and
    a link in its place is refused rather than written through."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            raise SystemExit(f"tdpo-train: {tmp} is not a regular file (a link?); "
                             "nothing was written through it")
        os.unlink(tmp)
    with open(tmp, mode, opener=_creating, **({} if "b" in mode else {"encoding": "utf-8"})) \
            as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _creating(path: str, _flags: int) -> int:
    """open()'s opener of a file that must not exist yet, nor be reached through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def _appending(path: str, _flags: int) -> int:
    """open()'s opener of a file appended to, never through a link."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)


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
        rows a killed attempt wrote past that point go. A last row cut short by a kill
        (no newline) goes too; any other row that is not one MetricsLog writes is
        refused, the log left as it was."""
        if self.rank != 0 or not os.path.lexists(self.path):
            return
        with open_file(self.path) as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n") and number == len(lines):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                raise refusal(self.path, f"its line {number} is not a row with a whole "
                              "number step")
            if step is None or row["step"] > step:
                break
            kept.append(line)
        with atomic_write(self.path) as f:
            f.writelines(kept)

    def append(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a", encoding="utf-8", opener=_appending) as f:
                f.write(json.dumps(row) + "\n")


def read_rows(path: str) -> list[dict]:
    """The rows of a JSONL log that MetricsLog wrote (metrics.jsonl, eval_examples.jsonl)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
