"""Peak memory of a region of code, for the benchmarks that run in one process per
method: CUDA allocated memory, or on CPU the resident set (VmHWM, reset to VmRSS by
writing 5 to /proc/self/clear_refs after returning freed memory to the OS). Also the
benchmarks' one check that a CUDA device can be measured."""
from __future__ import annotations

import ctypes
import gc
import sys

import torch

import tdpo_ext


def require_device(device: str) -> None:
    """Exits with the reason when `device` is a CUDA device and there is no GPU or no
    CUDA build of tdpo_ext to benchmark on it."""
    if torch.device(device).type == "cuda" and not (
            torch.cuda.is_available() and tdpo_ext.built_with_cuda()):
        sys.exit("--device cuda needs a GPU and tdpo_ext built with CUDA")


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def release_freed_memory(device: torch.device) -> None:
    """Collects garbage and hands what is free back: on CUDA waits for queued work; on
    CPU returns glibc's freed heap pages to the system (malloc_trim), so that what follows
    starts from live memory only and pays for its own fresh pages."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.peak``: peak bytes above the
    start of the region."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __enter__(self):
        release_freed_memory(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base = status_bytes("VmRSS")
            if status_bytes("VmHWM") > self.base + (4 << 20):
                raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM "
                                   "here: the peak would include earlier memory")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = status_bytes("VmHWM") - self.base
        return False
