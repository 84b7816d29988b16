"""Facts that the C++ side owns and Python and the builds read rather than copy: the
variant names, the size of a tile state, the bad-label message (csrc/python_module.cpp
exports them), and the list of sources both builds compile (csrc/build.txt)."""
import os
import platform
import re

import pytest
import torch

import oracle
from tdpo_ext import _C, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variants_come_from_the_ops():
    assert ops.VARIANTS == _C.VARIANTS == ("tdpo1", "tdpo2", "dpo")
    assert oracle.VARIANTS == ops.VARIANTS, "the float64 oracle must cover every variant"
    pair = [torch.zeros(2) for _ in range(4)]
    for variant in ops.VARIANTS:
        torch.ops.tdpo_ext.preference_loss(*pair, 0.1, 0.5, variant)


def test_tile_state_size_matches_the_kernels():
    """The fake kernel (used under torch.compile) sizes the state with TILE_STATE_FLOATS;
    the CPU kernel with kTileStateFloats."""
    policy, targets = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long)
    real = torch.ops.tdpo_ext.token_stats_tile(policy, policy, targets, -100, 0, None)
    meta = torch.ops.tdpo_ext.token_stats_tile(policy.to("meta"), policy.to("meta"),
                                               targets.to("meta"), -100, 0, None)
    assert real.shape == meta.shape == (2, 3, ops.TILE_STATE_FLOATS)


def test_bad_label_message_is_the_ops_message(device):
    policy = torch.randn(2, 4, 5, device=device)
    targets = torch.zeros(2, 4, dtype=torch.long, device=device)
    targets[1, 2] = 9
    with pytest.raises(RuntimeError) as raised:
        torch.ops.tdpo_ext.token_stats(policy, policy, targets, -100)
    assert str(raised.value).splitlines()[0] == _C.bad_label_message(
        row=1, position=2, label=9, vocab=5, ignore_index=-100)


def _build_list():
    """(kind, words) of each entry of csrc/build.txt."""
    with open(os.path.join(ROOT, "csrc", "build.txt")) as f:
        return [(line.split()[0], line.split()[1:]) for line in f
                if line.strip() and not line.startswith("#")]


def test_build_list_names_every_source_once():
    """A source added to csrc/ but not to the list would be left out of both builds. (A
    source may serve two kinds of build: csrc/checks.cpp is in the library and in the
    emulated CUDA ops.)"""
    entries = [(kind, words[0]) for kind, words in _build_list() if kind != "capability"]
    assert len(entries) == len(set(entries)), entries
    listed = [source for _, source in entries]
    on_disk = {os.path.relpath(os.path.join(d, name), ROOT)
               for d, _, names in os.walk(os.path.join(ROOT, "csrc")) for name in names
               if name.endswith((".cpp", ".cu"))}
    assert set(listed) == on_disk


def test_build_list_capabilities_are_the_ones_the_ops_know():
    """Each capability is a copy of the kernels that csrc/cpu/token_stats_cpu.cpp can
    pick (its TDPO_HAVE_<NAME> branch); this build runs one of them."""
    with open(os.path.join(ROOT, "csrc", "cpu", "token_stats_cpu.cpp")) as f:
        picked = set(re.findall(r"TDPO_HAVE_(\w+)", f.read()))
    capabilities = [words[0] for kind, words in _build_list() if kind == "capability"]
    assert set(capabilities) == picked | {"DEFAULT"}
    assert _C.cpu_kernel_capability() in capabilities


def test_the_kernels_run_are_torchs_capability_choice():
    """The kernel copy run is the one of torch's capability (ATEN_CPU_CAPABILITY=avx2 on an
    AVX512 CPU runs our AVX2 kernels: scripts/test.sh), or the best one built below it."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    chosen = torch.backends.cpu.get_cpu_capability()
    built = [words[0] for kind, words in _build_list()
             if kind == "capability" and words[1] in ("any", platform.machine())]
    below = order[:order.index(chosen) + 1] if chosen in order else ["DEFAULT"]
    assert _C.cpu_kernel_capability() == [c for c in below if c in built][-1]
