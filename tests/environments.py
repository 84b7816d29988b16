"""A fresh virtual environment that sees the packages of the environment this process runs
in: what `venv --system-site-packages` gives from the system Python, and does not from a
venv or conda environment (it exposes the *base* interpreter's site-packages, which may have
no torch). tests/test_install.py builds in such environments; scripts/test.sh runs the TRL
tests on the range's oldest release in one (`python3 tests/environments.py DIR` makes it
and prints its python)."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig


def running_site_folders() -> list:
    """The site-packages folders of the environment this process runs in (a venv's or conda
    environment's own, and the base interpreter's where it includes them): where its torch
    is."""
    folders = site.getsitepackages() + [sysconfig.get_path("purelib"),
                                        sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    return [f for f in dict.fromkeys(folders) if os.path.isdir(f)]


def _run(args) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def make_venv(path, sees_running_environment: bool) -> str:
    """A fresh virtual environment at path: its python. With sees_running_environment, a .pth
    file adds the running environment's site-packages after the new environment's own."""
    _run([sys.executable, "-m", "venv", str(path)])
    python = os.path.join(path, "bin", "python")
    if sees_running_environment:
        purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
        with open(os.path.join(purelib.strip(), "running_environment.pth"), "w") as f:
            # site.addsitedir, not the bare folders: their own .pth files (an editable
            # install, say) take effect as they do in the running environment.
            f.write("".join(f"import site; site.addsitedir({folder!r})\n"
                            for folder in running_site_folders()))
    return python


if __name__ == "__main__":
    print(make_venv(sys.argv[1], sees_running_environment=True))
