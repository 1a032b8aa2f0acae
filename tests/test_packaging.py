"""What `pip install .` (not editable) ships: every sub-package, with the top-level callbacks/ and datamodules/,
and the data/ and configs/ the README's commands name, found from any directory.

An editable install (the Makefile's) finds sub-packages on disk, so a package missing from pyproject's list
fails only for users who install a wheel: `gainrl_pl.engines` (the vLLM engine) was missing that way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

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
    for name in ("pyproject.toml", "README.md", "LICENSE", "gainrl_pl", "callbacks", "datamodules", "data", "configs"):
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

    # data/ and configs/ from outside any checkout: the README's `--config configs/demo.yaml`, the data paths in
    # it, and the code problems' default file resolve inside the wheel
    probe = ("import sys; from gainrl_pl.data.loading import resolve_data_path; "
             "from gainrl_pl.cli import resolve_config_paths; from gainrl_pl.data.code import load_code_problems; "
             "print(resolve_data_path('data/arithmetic/demo_train.jsonl')); "
             "print(resolve_data_path('data/eval/LICENSE-gsm8k')); "
             "print(resolve_config_paths(['fit', '--config', 'configs/demo.yaml'])[2]); "
             "print(resolve_config_paths(['fit', '--config=configs/code_demo.yaml'])[1].split('=', 1)[1]); "
             "print(len(load_code_problems()) > 0)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target),
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *paths, loaded = out.stdout.split()
    shipped = target / "gainrl_pl" / "shipped"
    assert paths == [str(shipped / "data/arithmetic/demo_train.jsonl"), str(shipped / "data/eval/LICENSE-gsm8k"),
                     str(shipped / "configs/demo.yaml"), str(shipped / "configs/code_demo.yaml")]
    assert loaded == "True"
    # the config parses there, its data paths with it (--print_config stops before any model loads)
    printed = subprocess.run([sys.executable, "-c", "from gainrl_pl.cli import main; main()", "fit", "--config",
                              "configs/demo.yaml", "--print_config"], cwd=tmp_path,
                             env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True,
                             text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "train_data: data/arithmetic/demo_train.jsonl" in printed.stdout


def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    """`gainrl-pl fit --config configs/demo.yaml` outside the checkout finds the shipped config; a file of that
    name in the CWD wins; a path found nowhere and inline YAML reach jsonargparse untouched (it reports them)."""
    from gainrl_pl.cli import resolve_config_paths

    monkeypatch.chdir(tmp_path)
    assert resolve_config_paths(["fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "1"]) == \
        ["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.max_steps", "1"]
    assert resolve_config_paths(["fit", "--config=configs/demo.yaml"]) == ["fit", f"--config={REPO}/configs/demo.yaml"]
    assert resolve_config_paths(["fit", "-c", "configs/demo.yaml"]) == ["fit", "-c", str(REPO / "configs/demo.yaml")]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/demo.yaml").write_text("trainer: {max_steps: 1}\n")
    for argv in (["fit", "--config", "configs/demo.yaml"], ["fit", "--config", "configs/missing.yaml"],
                 ["fit", "--config", "{trainer: {max_steps: 1}}"], ["fit", "--config"]):
        assert resolve_config_paths(argv) == argv
