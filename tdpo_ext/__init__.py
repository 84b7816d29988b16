"""tdpo-ext: fused, memory-lean Token-level Direct Preference Optimization (TDPO)."""
import torch  # noqa: F401  (_C links against torch's libraries: load them first)


def _extension_error(error: ImportError) -> ImportError:
    """What to tell a user whose tdpo_ext._C does not import: not built, or built
    against something else."""
    import glob
    import importlib.machinery
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    builds = [path for suffix in importlib.machinery.EXTENSION_SUFFIXES
              for path in glob.glob(os.path.join(here, "_C" + suffix))]
    how = ("build it with `pip install .` from the repository root, "
           "or in place with `python setup.py build_ext --inplace` (README.md, Install)")
    if not builds:
        return ImportError(f"tdpo_ext: the C++/CUDA extension tdpo_ext._C is not built (no "
                           f"_C extension module in {here}): {how}")
    return ImportError(f"tdpo_ext: the extension {builds[0]} does not load ({error}); it was "
                       f"probably built against another torch or Python: rebuild it, {how}")


try:
    from . import _C  # noqa: F401  (every module below needs the ops it registers)
except ImportError as error:
    raise _extension_error(error) from error

from .fused_linear import fused_linear_sequence_stats, fused_linear_tdpo_loss  # noqa: E402
from .ops import (PolicyTokenMetrics, TDPOOutput, built_with_cuda,  # noqa: E402
                  preference_loss, sequence_stats, shift_labels, tdpo_loss)

__all__ = ["PolicyTokenMetrics", "TDPOOutput", "built_with_cuda", "fused_linear_sequence_stats",
           "fused_linear_tdpo_loss", "preference_loss", "sequence_stats", "shift_labels",
           "tdpo_loss"]
__version__ = "0.1.0"
