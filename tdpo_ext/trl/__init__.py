"""TDPO for Hugging Face TRL users: TDPOConfig and TDPOTrainer (trainer.py), on TRL's
DPOConfig and DPOTrainer; the dataset check they run first (dataset_checks.py); TRL's
command line for them, ``tdpo-trl`` or ``python -m tdpo_ext.trl`` (cli.py); the TRL
releases they support, checked here, and what differs between them (compat.py). Install
with ``pip install --no-build-isolation "tdpo-ext[trl]"``; docs/TRL.md says more.

    from tdpo_ext.trl import TDPOConfig, TDPOTrainer
"""
from .compat import check_supported

check_supported()  # before the trainer reads TRL's internals

from .trainer import LOSS_TYPES, TDPOConfig, TDPOTrainer  # noqa: E402

__all__ = ["TDPOConfig", "TDPOTrainer", "LOSS_TYPES"]
