"""Streaming vocoder convs: the Triton kernels vs the torch reference and native torch convs.

CUDA: bf16 at the released vocoder's layers (upsample_initial_channel 512) for a push of 100
unit frames (2 s of audio): conv_pre, a resblock conv of stage 0 (256 ch, k11 d5), stage 2
(64 ch, k7 d3) and stage 4 (16 ch, k3), conv_post, and the transposed convs of stages 0, 2, 4.
Baselines: the fp32 torch reference, native cuDNN convs in bf16 (lrelu and residual as separate
ops), the same compiled, and the CUDA kernels when echox_cuda is built. Cases ending in -fp32
time fp32, the dtype the engine runs the vocoder in: there the Triton kernels use the tensor
cores as TF32 (as cuDNN does by default) and the CUDA kernels sum in exact fp32. CPU: fp32 small
shapes, torch only.
"""

import pytest
import torch
import torch.nn.functional as F

from echox.backend import cuda_extension_available
from echox.vocoder_ops import (conv1d_valid, conv1d_valid_reference, conv_transpose1d_window,
                               conv_transpose1d_window_reference)

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
# On CPU Triton runs only in the interpreter, whose timings say nothing about the kernel.
triton_on_gpu = pytest.mark.skipif(not HAS_GPU, reason="Triton is timed on CUDA only")
cuda_built = pytest.mark.skipif(not (HAS_GPU and cuda_extension_available()), reason="echox_cuda is not built")
compiled_on_gpu = pytest.mark.skipif(not HAS_GPU, reason="torch.compile is timed on CUDA only")

FRAMES = 100 if HAS_GPU else 10
# conv1d cases, name: (Cin, Cout, kernel, dilation, output steps, input slope, with residual)
CONVS = {
    "conv_pre": (128, 512, 7, 1, FRAMES, 1.0, False),
    "res-stage0-k11-d5": (256, 256, 11, 5, FRAMES * 5, 0.1, True),
    "res-stage2-k7-d3": (64, 64, 7, 3, FRAMES * 80, 0.1, True),
    "res-stage4-k3-d1": (16, 16, 3, 1, FRAMES * 320, 0.1, True),
    "conv_post": (16, 1, 7, 1, FRAMES * 320, 0.01, False),
} if HAS_GPU else {
    "conv_pre": (32, 128, 7, 1, FRAMES, 1.0, False),
    "res-stage0-k11-d5": (64, 64, 11, 5, FRAMES * 5, 0.1, True),
    "res-stage4-k3-d1": (4, 4, 3, 1, FRAMES * 320, 0.1, True),
}
# transposed-conv cases, name: (Cin, Cout, kernel, stride, input steps)
UPS = {
    "up-stage0-k11-s5": (512, 256, 11, 5, FRAMES), "up-stage2-k8-s4": (128, 64, 8, 4, FRAMES * 20),
    "up-stage4-k4-s2": (32, 16, 4, 2, FRAMES * 160),
} if HAS_GPU else {"up-stage0-k11-s5": (128, 64, 11, 5, FRAMES), "up-stage4-k4-s2": (8, 4, 4, 2, FRAMES * 160)}


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


def conv_inputs(cin, cout, kernel, dilation, steps, slope, with_residual):
    """(x, weight, bias, dilation, slope, residual): a stream buffer whose valid conv has `steps` outputs."""
    x = randn(1, cin, steps + (kernel - 1) * dilation)
    residual = randn(1, cout, steps) if with_residual else None
    return x, randn(cout, cin, kernel, scale=(cin * kernel) ** -0.5), randn(cout), dilation, slope, residual


def up_inputs(cin, cout, kernel, stride, steps):
    """(x, weight, bias, stride, start, count, slope): the window streaming asks for, one input of context a side."""
    pad = (kernel - stride) // 2
    start = stride + pad
    return (randn(1, cin, steps + 2), randn(cin, cout, kernel, scale=cin ** -0.5), randn(cout), stride, start,
            steps * stride, 0.1)


def native_conv(x, weight, bias, dilation, slope, residual):
    """What the layer costs in plain torch at the input dtype: lrelu, cuDNN conv, add."""
    y = F.conv1d(F.leaky_relu(x, slope), weight, bias, dilation=dilation)
    return y if residual is None else y + residual


def native_up(x, weight, bias, stride, start, count, slope):
    return F.conv_transpose1d(F.leaky_relu(x, slope), weight, bias, stride=stride)[..., start:start + count]


def inputs(case: str) -> tuple:
    """The op ("conv1d" or "up") of a case and its arguments (in fp32 for an -fp32 case)."""
    name = case.removesuffix("-fp32")
    op, args = ("conv1d", conv_inputs(*CONVS[name])) if name in CONVS else ("up", up_inputs(*UPS[name]))
    if case.endswith("-fp32"):
        args = tuple(arg.float() if isinstance(arg, torch.Tensor) else arg for arg in args)
    return op, args


# op: (torch reference, native torch, the dispatch)
OPS = {"conv1d": (conv1d_valid_reference, native_conv, conv1d_valid),
       "up": (conv_transpose1d_window_reference, native_up, conv_transpose1d_window)}
COMPILED = {op: torch.compile(native, dynamic=False) for op, (_, native, _) in OPS.items()} if HAS_GPU else {}
FP32_CASES = ["res-stage0-k11-d5-fp32", "res-stage2-k7-d3-fp32", "up-stage0-k11-s5-fp32"] if HAS_GPU else []
CASES = [*CONVS, *UPS, *FP32_CASES]


@pytest.mark.parametrize("case", CASES)
def test_torch_reference(timed, case):
    op, args = inputs(case)
    timed(OPS[op][0], *args)


@pytest.mark.parametrize("case", CASES)
def test_torch_native(timed, case):
    op, args = inputs(case)
    timed(OPS[op][1], *args)


@compiled_on_gpu
@pytest.mark.parametrize("case", CASES)
def test_torch_compiled(timed, case):
    op, args = inputs(case)
    timed(COMPILED[op], *args)


@triton_on_gpu
@pytest.mark.parametrize("case", CASES)
def test_triton(timed, case):
    op, args = inputs(case)
    timed(lambda *a: OPS[op][2](*a, backend_name="triton"), *args)


@cuda_built
@pytest.mark.parametrize("case", CASES)
def test_cuda(timed, case):
    op, args = inputs(case)
    timed(lambda *a: OPS[op][2](*a, backend_name="cuda"), *args)
