"""Install echox (and its Triton kernels as `echox_kernels`); build csrc only where CUDA can.

The CUDA extension `echox_cuda` is built when torch has CUDA and a CUDA toolkit is found; anywhere
else the pure-Python package installs without it and the dispatch uses torch or Triton.
"""

import os
import shutil
import warnings

from setuptools import find_packages, setup


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: CUDA_HOME (or CUDA_PATH), else the folder holding both bin/nvcc and
    include/cuda_runtime.h above the nvcc on the PATH, else /usr/local/cuda. torch guesses the folder
    above `which nvcc`, which is wrong when nvcc is a wrapper script in /usr/local/bin."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for folder in filter(None, candidates):
        if os.path.isfile(os.path.join(folder, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")):
            return folder
    return None


def cuda_extension():
    """The `echox_cuda` extension from csrc/, or nothing where it cannot be built.

    It needs torch with CUDA at build time. pip's default build isolation hides the installed
    torch from setup.py, so a GPU build is `pip install --no-build-isolation -e .`; with
    isolation (or on a CPU machine, or with ECHOX_NO_CUDA=1) the package installs without it.
    A build that fails warns and installs the pure-Python package too (the dispatch then uses
    Triton). Architectures come from TORCH_CUDA_ARCH_LIST, by default sm_80 and sm_90a.
    """
    cuda_home = find_cuda_home()
    if os.environ.get("ECHOX_NO_CUDA") == "1" or cuda_home is None:
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # read by torch's cpp_extension when it is imported
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp")))
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

    class BuildOrSkipExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # a compiler error must not fail the install of the Python code
                warnings.warn(f"echox_cuda was not built ({error}); installing without the CUDA kernels")
                self.extensions = []

    # No --use_fast_math: sampling must evaluate logf exactly as torch does to draw the same token.
    ext = CUDAExtension("echox_cuda", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext], {"build_ext": BuildOrSkipExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="echox",
    version="0.1.0",
    description="A compact, fast, from-scratch engine for the EchoX speech-to-speech LLM",
    packages=find_packages(include=["echox", "echox.*"]) + ["echox_kernels"],  # every subpackage, none forgotten
    package_dir={"echox": "echox", "echox_kernels": "kernels"},
    package_data={"echox.serve": ["static/*"]},  # the browser page `echox serve` hands out
    python_requires=">=3.10",
    install_requires=["torch", "safetensors", "tokenizers", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "transformers", "triton", "soundfile",
                 # the server tests: the server itself, the official realtime client, the browser driver, Ray
                 "aiohttp>=3.9", "openai[realtime]>=1.107", "playwright>=1.40", "ray[serve]==2.60.0"],
        "audio": ["soundfile"],
        "serve": ["aiohttp>=3.9"],  # `echox serve`
        "ray": ["ray[serve]==2.60.0", "aiohttp>=3.9"],  # `echox serve-ray`: replicas behind Ray Serve
        "train": ["matplotlib"],  # the loss plot (bench/plot_training.py); training itself needs only torch
    },
    entry_points={"console_scripts": ["echox = echox.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
