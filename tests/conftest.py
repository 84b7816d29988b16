"""Test-wide settings: the devices every kernel test runs on, a reproducible hypothesis
profile, and the modules of the quick tier."""
import os
import sys

import pytest
import torch
from hypothesis import settings

import tdpo_ext

# The helper modules beside the tests (oracle.py, inputs.py, ...) import each other by
# their plain names.
sys.path.insert(0, os.path.dirname(__file__))

# "ci", the default: the same examples on every run (derandomize) and no example
# database, so that a failure in CI reproduces anywhere; 50 examples per property keeps
# the suite within minutes on two cores. "explore": fresh random examples and many more
# of them, for hunting bugs locally:
#   TDPO_HYPOTHESIS_PROFILE=explore python -m pytest tests
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True,
                          database=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("TDPO_HYPOTHESIS_PROFILE", "ci"))

# The quick tier, `pytest -m quick` (README, Tests): the core ops against the oracle, the
# fused head, compile, errors and import checks, whole modules, named in this one place.
QUICK_MODULES = (
    "test_compile",
    "test_errors",
    "test_fused_linear",
    "test_import",
    "test_policy_metrics",
    "test_preference_loss",
    "test_sequence_stats",
    "test_tdpo_loss",
    "test_token_stats_tile",
)
_missing = [m for m in QUICK_MODULES
            if not os.path.exists(os.path.join(os.path.dirname(__file__), m + ".py"))]
assert not _missing, f"QUICK_MODULES names modules that do not exist: {_missing}"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.stem in QUICK_MODULES:
            item.add_marker(pytest.mark.quick)


def pytest_ignore_collect(collection_path, config):
    """With -m quick, the other test modules are not even imported (some import trl and
    transformers: seconds each)."""
    if (config.getoption("markexpr") == "quick" and collection_path.suffix == ".py"
            and collection_path.stem.startswith("test_")):
        return collection_path.stem not in QUICK_MODULES
    return None


_CUDA_UNBUILT = pytest.mark.skipif(
    not tdpo_ext.built_with_cuda(),
    reason="tdpo_ext was built without CUDA kernels")
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=_CUDA_UNBUILT)]
                     if torch.cuda.is_available() else [])


def pytest_report_header(config):
    # Which SIMD paths this run takes (ATEN_CPU_CAPABILITY picks torch's and ours):
    # scripts/test.sh runs the op tests on two.
    from tdpo_ext import _C
    return (f"CPU capability: torch {torch.backends.cpu.get_cpu_capability()}, tdpo_ext "
            f"kernels {_C.cpu_kernel_capability()}")


@pytest.fixture(params=DEVICES, scope="session")
def device(request) -> str:
    return request.param
