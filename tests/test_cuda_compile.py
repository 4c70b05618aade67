"""Compile every csrc/*.cu for sm_90a and sm_80 with warnings as errors (nvcc -c only).

This is the check of the CUDA kernels that runs without a GPU: device code for both targets
must build cleanly. The two architectures compile in parallel to keep the test quick.
"""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = {"sm_90a": "arch=compute_90a,code=sm_90a", "sm_80": "arch=compute_80,code=sm_80"}
STRICT = ["-std=c++17", "-O3", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def compile_cu(source: Path, gencode: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [shutil.which("nvcc"), "-c", str(source), "-o", str(out), "-gencode", gencode, *STRICT]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.nvcc
def test_sources_exist():
    assert {p.name for p in SOURCES} >= {"decode_attention.cu", "head_select.cu"}


@pytest.mark.nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles_without_warnings(source, tmp_path):
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        runs = {arch: pool.submit(compile_cu, source, gencode, tmp_path / f"{source.stem}.{arch}.o")
                for arch, gencode in ARCHS.items()}
    for arch, run in runs.items():
        result = run.result()
        log = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and not log, f"nvcc {source.name} for {arch}:\n{log}"
