"""The project as a package (pyproject.toml): built and installed into a fresh virtual environment, `minivit` (with
its kernels, `minivit.kernels`) imports from another folder and its command lines run, beside the current Hugging Face
packages. Offline: --no-build-isolation uses this environment's setuptools (the `test` extra asks for one that builds
wheels without the `wheel` package), --no-deps this machine's torch (a --system-site-packages venv sees it)."""
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv that sees this machine's packages, with minivit built from a copy of the checkout and installed
    into it (not editable) -> (python, env for a clean run from another folder, the venv's folder)."""
    tmp_path = tmp_path_factory.mktemp("package")
    src = tmp_path / "src"  # a copy of what the package is built from, so that the build writes nothing into ROOT
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "minivit", src / "minivit", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    run_command([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / "bin" / "python"
    run_command([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                 "--no-build-isolation", "--no-index", src], timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return python, env, venv


def test_pip_install_into_a_fresh_venv_imports_from_any_folder(venv, tmp_path):
    python, env, folder = venv
    proc = run_command([python, "-c", "import minivit, minivit.kernels, minivit.vit; print(minivit.__file__); "
                        "print(minivit.kernels.__file__)"], cwd=tmp_path, env=env)
    site = str(folder / "lib")
    assert all(line.startswith(site) for line in proc.stdout.split()), proc.stdout  # the installed copy, not ROOT
    proc = run_command([python, "-m", "minivit.tools.knn", "--help"], cwd=tmp_path, env=env)
    assert "Weighted k-NN" in proc.stdout


def test_the_build_needs_no_wheel_package():
    """setuptools >= 70.1 builds wheels itself; older ones need the separate `wheel` package, which a fresh machine may
    lack ("invalid command 'bdist_wheel'"). pyproject.toml asks for such a setuptools for the build and for the tests."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires = ["setuptools>=70.1"]' in text
    assert '"setuptools>=70.1"' in text.split("[project.optional-dependencies]")[1]


def test_installs_only_the_name_minivit():
    """Every file the package installs lies under minivit/: no top-level name that another project may own (PyPI's
    `kernels` is Hugging Face's, and transformers >= 5.25 depends on it)."""
    text = (ROOT / "pyproject.toml").read_text()
    packages = text.split("packages = ")[1].split("\n")[0]
    assert all(name.strip(' "[]').startswith("minivit") for name in packages.split(",")), packages


def test_beside_current_transformers_in_one_process(venv, tmp_path):
    """The installed minivit and transformers (with Hugging Face's own `kernels`, when that is installed) import together
    in one process, in either order, and no file of one dist lies where the other's does (so pip's install order
    cannot matter: neither overwrites the other)."""
    pytest.importorskip("transformers", reason="transformers is not installed (.ci/run installs the current one)")
    python, env, folder = venv
    both = "import transformers; from transformers import ViTModel; import minivit.vit, minivit.kernels"
    for code in (both, "import minivit.vit, minivit.kernels; from transformers import ViTModel; import transformers"):
        code += ("; import importlib.util as u; s = u.find_spec('kernels'); "
                 "print('hf-kernels', s and s.origin); print('ours', minivit.kernels.__file__)")
        proc = run_command([python, "-c", code], cwd=tmp_path, env=env)
        lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
        assert lines["ours"].startswith(str(folder / "lib")) and "minivit" in lines["ours"]
        assert lines["hf-kernels"] == "None" or "minivit" not in lines["hf-kernels"]
    tops = ("import importlib.metadata as m, sys\n"
            "for d in sys.argv[1:]:\n"
            "    try: print(d, *sorted({str(f).split('/')[0] for f in m.files(d) or [] if '.dist-info' not in str(f)}))\n"
            "    except m.PackageNotFoundError: pass")
    proc = run_command([python, "-c", tops, "minivit", "transformers", "kernels"], cwd=tmp_path, env=env)
    names = {line.split()[0]: set(line.split()[1:]) for line in proc.stdout.splitlines()}
    assert names["minivit"] == {"minivit"}, names["minivit"]
    assert not any("minivit" in names[d] for d in names if d != "minivit"), names
