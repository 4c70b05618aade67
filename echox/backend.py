"""One dispatch point for the hot ops: torch reference, Triton kernel or CUDA kernel.

Each op asks `choose(op, tensor, override)`. The answer is, in order of precedence: the
explicit `override` argument, the `ECHOX_BACKEND` environment variable, and otherwise the
fastest implementation available for the tensor's device. CPU tensors always run the torch
reference, which is the definition every kernel is tested against.

On a GPU the CUDA kernel is preferred, except for the vocoder convs where the Triton kernel's
tl.dot runs on the tensor cores (16-bit activations, or fp32 as TF32 where torch allows TF32
for its own convolutions): the CUDA conv kernel sums in fp32 on the CUDA cores, the exact mode.
"""

import functools
import importlib
import os

import torch

from .errors import EchoXError

BACKENDS = ("torch", "triton", "cuda")
VOCODER_CONV_OPS = ("conv1d_valid", "conv_transpose1d_window")


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.cache
def cuda_extension_available() -> bool:
    """The compiled csrc extension, built by setup.py only where nvcc and CUDA torch exist."""
    try:
        importlib.import_module("echox_cuda")
    except ImportError:
        return False
    return True


def _requested(override: str | None) -> str | None:
    name = override or os.environ.get("ECHOX_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise EchoXError(f"backend {name!r} is not one of {', '.join(BACKENDS)} (ECHOX_BACKEND or backend=)")
    return name


def choose(op: str, tensor: torch.Tensor, override: str | None = None,
           kernels: tuple[str, ...] = ("triton", "cuda")) -> str:
    """Which implementation of `op` runs for `tensor`; `kernels` lists the ones `op` has besides
    torch. Asking for one it lacks (say ECHOX_BACKEND=cuda for an op with only a Triton kernel)
    falls back to the default choice among those it has."""
    name = _requested(override)
    if tensor.dtype == torch.float64:  # no kernel takes it (the vocoder's duration predictor runs in it)
        return "torch"
    if name not in (None, "torch", *kernels):
        name = None
    on_gpu = tensor.is_cuda
    if name == "cuda":
        if not (on_gpu and cuda_extension_available()):
            raise EchoXError(f"{op}: the CUDA backend needs a GPU tensor and the built echox_cuda extension")
        return "cuda"
    if name == "triton":
        # Off the GPU, Triton kernels run only in the interpreter (TRITON_INTERPRET=1), as in tests.
        if not triton_available() or not (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"):
            raise EchoXError(f"{op}: the Triton backend needs triton and a GPU (or TRITON_INTERPRET=1)")
        return "triton"
    if name == "torch" or not on_gpu:
        return "torch"
    for kernel in _fastest_first(op, tensor):
        if kernel in kernels and (cuda_extension_available() if kernel == "cuda" else triton_available()):
            return kernel
    return "torch"


def _fastest_first(op: str, tensor: torch.Tensor) -> tuple[str, str]:
    """The default order of the kernels on a GPU."""
    tensor_cores = tensor.dtype != torch.float32 or torch.backends.cudnn.allow_tf32
    if op in VOCODER_CONV_OPS and tensor_cores:
        return ("triton", "cuda")
    return ("cuda", "triton")
