"""`import tdpo_ext` where the extension is not built, or does not load, says so and how
to build it (instead of "cannot import name '_C' from partially initialized module")."""
import os
import shutil
import subprocess
import sys

import tdpo_ext

PACKAGE = os.path.dirname(os.path.abspath(tdpo_ext.__file__))
# An editable install (`pip install -e .`, as scripts/setup.sh does) adds an import hook
# that would hand the copy the installed checkout's _C: a fresh checkout has none.
IMPORT_WITHOUT_INSTALL = """
import sys
sys.meta_path = [f for f in sys.meta_path
                 if not getattr(f, "__module__", "").startswith("__editable__")]
import tdpo_ext
"""


def import_copy(tmp_path, fake_extension=None):
    """Imports a copy of the package without its built extension (or with the file
    fake_extension in its place) in a fresh interpreter; returns (exit status, stderr)."""
    shutil.copytree(PACKAGE, tmp_path / "tdpo_ext",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if fake_extension is not None:
        (tmp_path / "tdpo_ext" / os.path.basename(tdpo_ext._C.__file__)).write_bytes(
            fake_extension)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_INSTALL], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr


def test_unbuilt_checkout_says_how_to_build(tmp_path):
    status, stderr = import_copy(tmp_path)
    assert status != 0
    last = stderr.strip().splitlines()[-1]
    assert "tdpo_ext._C is not built" in last, stderr
    assert "python setup.py build_ext --inplace" in last, stderr
    assert "partially initialized" not in last, stderr


def test_broken_build_says_to_rebuild(tmp_path):
    status, stderr = import_copy(tmp_path, fake_extension=b"not a shared library")
    assert status != 0
    last = stderr.strip().splitlines()[-1]
    assert "does not load" in last and "rebuild it" in last, stderr
