"""
Hestia as users install it: a wheel and its dependencies, built from this checkout.

C{build_wheelhouse(dest)} runs C{pip wheel} on the repository (what C{pip install .}
and the Dockerfile do), so the wheel holds exactly what setup.cfg puts in it, and
every dependency's wheel is beside it: a venv or an image can then be installed
with C{--no-index}, as the container tests do on a machine with no registry.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def source_tree(dest: Path) -> Path:
    """
    A copy of the checkout's files (tracked or new, not ignored) in C{dest}.

    pip builds a local directory in place, and setuptools reuses a stale C{build/lib}
    it finds there: a wheel built from the checkout itself can hold files that the
    packaging configuration no longer (or never) selects.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, timeout=60,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def build_wheelhouse(dest: Path) -> Path:
    """Hestia's wheel and its dependencies' in C{dest}; returns Hestia's wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hestia-src-") as scratch:
        tree = source_tree(Path(scratch))
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(tree)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False,
        )
    assert built.returncode == 0, built.stderr[-4000:]
    wheels = sorted(dest.glob("hestia-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def fresh_venv(where: Path, wheelhouse: Path) -> Path:
    """A new virtualenv with Hestia installed from C{wheelhouse} only; returns its bin/."""
    venv.EnvBuilder(with_pip=True).create(where)
    bin_dir = where / "bin"
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-index",
         "--find-links", str(wheelhouse), "hestia"],
        check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
    )
    return bin_dir
