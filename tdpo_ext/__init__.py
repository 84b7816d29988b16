"""tdpo-ext: fused, memory-lean Token-level Direct Preference Optimization (TDPO)."""
from .fused_linear import fused_linear_sequence_stats, fused_linear_tdpo_loss
from .ops import (TDPOOutput, built_with_cuda, preference_loss, sequence_stats, shift_labels,
                  tdpo_loss)

__all__ = ["TDPOOutput", "built_with_cuda", "fused_linear_sequence_stats", "fused_linear_tdpo_loss",
           "preference_loss", "sequence_stats", "shift_labels", "tdpo_loss"]
__version__ = "0.1.0"
