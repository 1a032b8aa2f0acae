"""What `pip install .` (not editable) ships: every sub-package, with the top-level callbacks/ and datamodules/.

An editable install (the Makefile's) finds sub-packages on disk, so a package missing from pyproject's list
fails only for users who install a wheel: `gainrl_pl.engines` (the vLLM engine) was missing that way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_packages() -> set[str]:
    found = set()
    for root, name in (("gainrl_pl", "gainrl_pl"), ("callbacks", "gainrl_pl.callbacks"),
                       ("datamodules", "gainrl_pl.datamodules")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            found.add(".".join((name, *rel)))
    return found


def test_pyproject_lists_every_package_on_disk():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert source_packages() - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_a_wheel_install_imports_every_package(tmp_path):
    # a clean copy of the sources: setuptools reuses a checkout's stale build/ directory, which could hold a
    # package that the list no longer names
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE", "gainrl_pl", "callbacks", "datamodules"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    # each module's file, not just its import: an editable install of this checkout in the same environment
    # would otherwise supply what the wheel lacks
    probe = "import importlib, sys; print('\\n'.join(importlib.import_module(m).__file__ for m in sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", probe, *sorted(source_packages()), "gainrl_pl.cli"],
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    outside = [f for f in out.stdout.split() if not f.startswith(str(target))]
    assert not outside, f"not in the installed wheel: {outside}"
