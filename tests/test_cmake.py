"""The CMake build (CMakeLists.txt): configures and builds the ops library (target
tdpo_ext) from scratch into a temporary folder, then loads it, without the tdpo_ext
package, and runs its ops
(tests/cmake_library_check.py). Slow: about 2 minutes of compiling on two cores."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cmake_library_check.py")

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (f"{' '.join(cmd)} failed ({result.returncode}):\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def cmake_library(tmp_path_factory) -> str:
    build_dir = tmp_path_factory.mktemp("cmake_build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", ROOT, "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
         f"-DPython3_EXECUTABLE={sys.executable}"])
    run(["cmake", "--build", str(build_dir), "--target", "tdpo_ext", "-j2"])
    return str(build_dir / "libtdpo_ext.so")


def test_library_loads_and_computes(cmake_library, tmp_path):
    # Run from an empty folder so that nothing from the checkout is importable by chance.
    result = run([sys.executable, CHECK_SCRIPT, cmake_library], cwd=tmp_path)
    assert "cmake library ok" in result.stdout
