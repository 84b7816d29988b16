"""TDPO for Hugging Face TRL users: TDPOConfig and TDPOTrainer (trainer.py), on TRL's
DPOConfig and DPOTrainer; the dataset check they run first (dataset_checks.py); TRL's
command line for them, ``tdpo-trl`` or ``python -m tdpo_ext.trl`` (cli.py). Install with
``pip install --no-build-isolation "tdpo-ext[trl]"``; docs/TRL.md says more.

    from tdpo_ext.trl import TDPOConfig, TDPOTrainer
"""
from .trainer import LOSS_TYPES, TDPOConfig, TDPOTrainer

__all__ = ["TDPOConfig", "TDPOTrainer", "LOSS_TYPES"]
