"""The extension shares torch's libstdc++ (CMakeLists.txt, tdpo_torch).

Built by a GCC that has only libstdc++.a (the /opt/gcc of a GPU machine we were lent), the
extension carried a private static libstdc++: every error message that formats a number
was cut short at it here and crashed the process with a segmentation fault there."""
import shutil
import subprocess

import pytest
import torch

import tdpo_ext


def test_extension_links_the_shared_libstdcxx():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not installed")
    out = subprocess.run([ldd, tdpo_ext._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert "libstdc++.so" in out, f"tdpo_ext._C does not link the shared libstdc++:\n{out}"


def test_error_messages_keep_the_numbers_they_format():
    # A static libstdc++ copy stopped this message at "got [".
    with pytest.raises(RuntimeError, match=r"must have shape \(N, T, V\), got \[2, 4\](\n|$)"):
        torch.ops.tdpo_ext.token_stats(torch.randn(2, 4), torch.randn(2, 4, 5),
                                       torch.zeros(2, 4, dtype=torch.long), -100)
