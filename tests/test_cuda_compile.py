"""Compile every csrc/*.cu for sm_90a and sm_80 with warnings as errors (nvcc -c only).

This is the check of the CUDA kernels that runs without a GPU: device code for both targets
must build cleanly. The two architectures compile in parallel to keep the test quick.
"""

import re
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


def ptx_entries(source: Path, out: Path) -> dict[str, str]:
    """The sm_90a PTX of `source`, one text per kernel entry, by mangled name."""
    cmd = [shutil.which("nvcc"), "-ptx", str(source), "-o", str(out), "-gencode", ARCHS["sm_90a"], "-std=c++17", "-O3"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    parts = re.split(r"\n\.(?:visible )?\.?entry ", out.read_text())[1:]
    return {part.split("(")[0]: part for part in parts}


@pytest.mark.nvcc
def test_sampling_rounds_like_the_reference(tmp_path):
    """The reference rounds logits * (1 / T) and then adds the Gumbel noise (torch's CUDA division by
    a scalar is that multiply): the sampling GEMV must use explicit mul.rn / add.rn for each of its
    4 batch-tile rows (a plain `a * b + c` becomes one fma.rn, a single rounding), and nothing on
    the selection paths may divide approximately."""
    entries = ptx_entries(CSRC / "head_select.cu", tmp_path / "head_select.ptx")
    sampling = [text for name, text in entries.items() if "head_gemv_kernel" in name and "ModeE1" in name]
    assert len(sampling) == 3  # fp32, fp16, bf16
    for text in sampling:
        assert text.count("mul.rn.f32") >= 4 and text.count("add.rn.f32") >= 4
    assert not any("div.full" in text or "div.approx" in text for text in entries.values())
