"""Check 1 of the CUDA backend without a GPU: every .cu compiles with nvcc for sm_80 and sm_90.

The text compiled is exactly what ``cupy_gpu`` hands to ``cupy.RawModule`` (headers inlined
by ``_host.read_source``, NVRTC's default C++17 dialect), with warnings as errors and ptxas
told to fail on register spills or local-memory use (a 3.5 KB kernel-argument table copied to local memory
would show up here).  Skips only when nvcc is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources

import pytest

from fastopt.kernels.cuda import _host

NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def nvcc_command(src_path, out_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [NVCC, "-std=c++17", *_host.NVRTC_OPTIONS, *gencode, "-c", src_path, "-o", out_path,
            "-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror"]


def test_every_source_compiles(tmp_path):
    files = sorted(f.name for f in resources.files("fastopt.kernels.cuda").iterdir()
                   if f.name.endswith(".cu"))
    assert files == sorted(_host.SOURCES), "a .cu file the loader does not know"
    procs = []
    for src in files:
        path = tmp_path / src
        path.write_text(_host.read_source(src))
        procs.append((src, subprocess.Popen(nvcc_command(str(path), str(tmp_path / (src + ".o"))),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    failures = []
    for src, p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            failures.append(f"--- {src} (exit {p.returncode})\n{out}")
    assert not failures, "\n".join(failures)
