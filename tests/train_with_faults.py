"""tdpo-train with faults: runs tdpo_ext.training.train.main and kills this process with
SIGKILL at the first point of a list that no earlier attempt has been killed at, as a
crash or an out-of-memory kill would. A point is an fnmatch pattern over "EVENT
WHERE...": an event of tdpo_ext.training.hooks and its place, "step sft 2" (a stage's
name and step), "pairs_written train", "stage_done tdpo2 4"; or "torch.save PATH STEP",
which kills a torch.save midway, half of its bytes written (STEP: the step of a
checkpoint, None for other objects).

    python tests/train_with_faults.py USED_FILE 'POINT;POINT;...' TDPO-TRAIN-ARGS...

USED_FILE records the points killed at, one a line, so that a resumed attempt runs past
them."""
import fnmatch
import io
import os
import signal
import sys

import torch

from tdpo_ext.training import hooks, train


def describe(event: str, where: dict) -> str:
    parts = [event]
    for value in where.values():
        parts += [value.name, str(value.step)] if hasattr(value, "step") else [str(value)]
    return " ".join(parts)


def main():
    used_file, points, argv = sys.argv[1], sys.argv[2].split(";"), sys.argv[3:]
    used = open(used_file).read().splitlines() if os.path.exists(used_file) else []

    def unused_point(here: str):
        return next((p for p in points if p not in used and fnmatch.fnmatchcase(here, p)),
                    None)

    def kill(point):
        with open(used_file, "a") as f:
            f.write(point + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_at_unused_points(event, where):
        point = unused_point(describe(event, where))
        if point is not None:
            kill(point)

    real_save = torch.save

    def save_killed_midway(obj, f, *args, **kwargs):
        step = obj.get("step") if isinstance(obj, dict) else None
        point = unused_point(f"torch.save {getattr(f, 'name', f)} {step}")
        if point is None:
            return real_save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        with open(f, "wb") if isinstance(f, str) else open(f.name, "r+b") as out:
            out.write(whole.getvalue()[:len(whole.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        kill(point)

    torch.save = save_killed_midway
    with hooks.listening(kill_at_unused_points):
        sys.exit(train.main(argv))


if __name__ == "__main__":
    main()
