"""Packaging: the top-level kernels/ folder ships as fastopt.kernels, with the CUDA sources."""

import importlib.resources
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_has_kernels_subpackage():
    import fastopt.kernels
    import fastopt.kernels.reference  # noqa: F401

    files = importlib.resources.files("fastopt.kernels")
    assert files.joinpath("reference.py").is_file()
    cu = [f.name for f in files.joinpath("cuda").iterdir() if f.name.endswith((".cu", ".cuh"))]
    want = sorted(p.name for p in (ROOT / "kernels" / "cuda").glob("*.cu*"))
    assert sorted(cu) == want


def test_no_top_level_kernels_module_is_installed():
    # run from a neutral directory so the checkout itself is not on sys.path
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                          "print(u.find_spec('kernels') is None)"], capture_output=True, text=True,
                         cwd=os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/",
                         check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.slow
def test_wheel_contains_fastopt_kernels(tmp_path):
    """Build the wheel the way ``pip install .`` does and read its file list."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastopt/kernels/__init__.py" in names
    assert "fastopt/apps/demo.py" in names and "fastopt/apps/bench.py" in names
    assert "fastopt/kernels/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package leaked"
    cu = sorted(p.name for p in (ROOT / "kernels" / "cuda").glob("*.cu*"))
    assert cu, "the CUDA sources are missing from the checkout"
    for name in cu:
        assert f"fastopt/kernels/cuda/{name}" in names
