"""The project as a package (pyproject.toml): built and installed into a fresh virtual environment, `minivit` and
`kernels` import from another folder and their command lines run. Offline: --no-build-isolation uses this
machine's setuptools, --no-deps this machine's torch (a --system-site-packages venv sees it)."""
import os
import shutil
import sys
from pathlib import Path

from conftest import run_command

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_into_a_fresh_venv_imports_from_any_folder(tmp_path):
    # a copy of what the package is built from, so that the build writes nothing into the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("minivit", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    run_command([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / "bin" / "python"
    run_command([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                 "--no-build-isolation", "--no-index", src], timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run_command([python, "-c", "import minivit, kernels, minivit.vit; print(minivit.__file__); "
                        "print(kernels.__file__)"], cwd=elsewhere, env=env)
    site = str(venv / "lib")
    assert all(line.startswith(site) for line in proc.stdout.split()), proc.stdout  # the installed copy, not ROOT
    proc = run_command([python, "-m", "minivit.knn", "--help"], cwd=elsewhere, env=env)
    assert "Weighted k-NN" in proc.stdout
