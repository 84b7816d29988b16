"""Named points of a run where a test can step in (a fault-injection seam), kept out of
the loop's logic: the loop and the pair sampler call `reached(event, **where)`, which
does nothing unless a listener is installed. Tests install one to read the state at a
point (the accumulated gradient) or to kill the process there
(tests/train_with_faults.py).

Events: "gradients" (stage, after a step's backward passes, before clipping), "step" (a
step's metrics row written and its checkpoint, if due, saved), "pairs_written" (one
split's pairs file written), "stage_done" (a stage's last step taken)."""
from __future__ import annotations

import contextlib

_listeners: list = []


def reached(event: str, **where) -> None:
    for listener in list(_listeners):
        listener(event, where)


@contextlib.contextmanager
def listening(listener):
    """Calls listener(event, where) at every point reached inside the block."""
    _listeners.append(listener)
    try:
        yield listener
    finally:
        _listeners.remove(listener)
