"""The TRL releases that tdpo_ext.trl supports, checked at import, and the differences
between them that the trainer meets: one function per difference, each named with the TRL
release that changed it. requirements/trl.txt states the same range for pip (a test checks
that they agree); docs/TRL.md says what differs and how the range is tested."""
from __future__ import annotations

import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# From the oldest to the newest minor release that the TRL tests passed on.
SUPPORTED = ">=1.8,<1.17"
TRL_VERSION = Version(trl.__version__)


def check_supported(version: Version = TRL_VERSION) -> None:
    """Raises ImportError, naming the installed and the supported releases and how to
    install one, unless ``version`` is in SUPPORTED (its pre-releases included): the
    trainer reads DPOTrainer's internals, which TRL changes between minor releases, so on
    another release it would fail later, from inside TRL, or compute another loss."""
    if not SpecifierSet(SUPPORTED).contains(version, prereleases=True):
        raise ImportError(
            f"tdpo_ext.trl supports TRL{SUPPORTED} (the releases its tests ran on), and "
            f"this environment has TRL {version}: install a supported release with "
            f"`pip install \"trl{SUPPORTED}\"`")


def tensor_parallel_size(trainer) -> int:
    """The tensor-parallel size by which DPOTrainer divides its token count: its _tp_size
    since TRL 1.13; before, DPOTrainer had no tensor parallelism, so 1."""
    return trainer._tp_size if TRL_VERSION >= Version("1.13") else 1


def liger_bypasses_compute_loss() -> bool:
    """Whether use_liger_kernel=True makes DPOTrainer.compute_loss call its own
    _compute_loss_liger (Liger's fused DPO loss) instead of the _compute_loss that
    TDPOTrainer replaces: before TRL 1.14; since, it calls _compute_loss either way."""
    return TRL_VERSION < Version("1.14")


def seed_before_adapters(seed: int) -> None:
    """Seeds torch, numpy and random with ``seed`` before DPOTrainer creates PEFT adapters
    (initialized at random), as DPOTrainer does itself since TRL 1.15; before 1.15 the
    adapters came from whatever state the caller left the generators in."""
    if TRL_VERSION < Version("1.15"):
        from transformers import set_seed
        set_seed(seed)
