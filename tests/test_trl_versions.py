"""The TRL releases tdpo_ext.trl supports: the range that requirements/trl.txt gives pip is
the one checked at import, and on any other release `import tdpo_ext.trl` stops with one
message naming the installed and the supported releases and how to install one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")

from packaging.version import Version  # noqa: E402

from tdpo_ext.trl import compat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_requirements_state_the_supported_range():
    with open(os.path.join(ROOT, "requirements", "trl.txt")) as f:
        trl_lines = [line.strip() for line in f if line.startswith("trl")]
    assert trl_lines == [f"trl{compat.SUPPORTED}"]


@pytest.mark.parametrize("version", ["1.8.0", "1.12.0", "1.16.0", "1.16.1.dev0"])
def test_supported_releases_pass(version):
    compat.check_supported(Version(version))


@pytest.mark.parametrize("version", ["1.7.1", "1.17.0", "1.17.0.dev0", "2.0.0"])
def test_other_release_is_named_at_import(version):
    """A faked trl.__version__ in a fresh interpreter: the import's last line is the one
    message, not an error from inside TRL."""
    code = f"import trl; trl.__version__ = {version!r}; import tdpo_ext.trl"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"ImportError: tdpo_ext.trl supports TRL{compat.SUPPORTED} (the releases its tests "
        f"ran on), and this environment has TRL {version}: install a supported release "
        f"with `pip install \"trl{compat.SUPPORTED}\"`"), done.stderr[-2000:]


def test_liger_kernel_is_refused_where_it_would_replace_the_loss(tmp_path):
    """Before TRL 1.14, use_liger_kernel=True routes DPOTrainer.compute_loss to Liger's DPO
    loss, past TDPOTrainer's: refused there; since 1.14 it only patches kernels."""
    from tdpo_ext.trl import TDPOConfig

    def config():
        return TDPOConfig(output_dir=str(tmp_path), use_cpu=True, use_liger_kernel=True)

    if compat.TRL_VERSION < Version("1.14"):
        with pytest.raises(ValueError, match=r"use_liger_kernel=True makes TRL 1\.\d+\.\d+ "
                                             r"compute Liger's DPO loss instead of TDPO's"):
            config()
    else:
        assert config().use_liger_kernel
