"""Output head + selection: the fused Triton and CUDA head_select vs the torch reference (matmul + select).

CUDA: bf16 LLM heads of EchoX-8B (128257 x 4096) and 3B (128257 x 3072) with the released
sampling (T 0.2, top-p 0.9) and greedy, and a restricted unit head (8193 x 768, greedy) as the
echo decoder uses. Each kernel must pick the reference's row before it is timed (greedy: the
argmax; sampling: the same draw for the same seed and step). CPU: fp32 small and mid heads,
torch reference only.
"""

import functools

import pytest
import torch

from echox import sampling
from echox.backend import cuda_extension_available
from echox.sampling import GREEDY, RELEASED_SAMPLING, select_reference

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# On CPU Triton runs only in the interpreter, whose timings say nothing about the kernel.
triton_on_gpu = pytest.mark.skipif(not HAS_GPU, reason="Triton is timed on CUDA only")
cuda_built = pytest.mark.skipif(not (HAS_GPU and cuda_extension_available()), reason="echox_cuda is not built")

# name: (batch, head rows R, width h, params)
CASES = {
    "8b-llm-released": (1, 128257, 4096, RELEASED_SAMPLING), "8b-llm-greedy": (1, 128257, 4096, GREEDY),
    "3b-llm-released": (1, 128257, 3072, RELEASED_SAMPLING), "unit-head-greedy": (1, 8193, 768, GREEDY),
} if HAS_GPU else {
    "small-released": (1, 1024, 64, RELEASED_SAMPLING), "mid-greedy": (1, 8193, 256, GREEDY),
}
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32


def make_inputs(batch, rows, width, params):
    hidden = torch.randn(batch, width, device=DEVICE, dtype=DTYPE)
    weight = (torch.randn(rows, width, device=DEVICE) * 2 / width ** 0.5).to(DTYPE)
    return hidden, weight, params, torch.zeros((), device=DEVICE, dtype=torch.int64)


def torch_reference(hidden, weight, params, step):
    return select_reference(hidden.float() @ weight.float().T, params, step)


def torch_native_matmul(hidden, weight, params, step):
    """A faster torch baseline: the matmul in the weights' dtype, selection in fp32."""
    return select_reference(hidden @ weight.T, params, step)


@pytest.mark.parametrize("case", CASES)
def test_torch_reference(timed, case):
    timed(torch_reference, *make_inputs(*CASES[case]))


@pytest.mark.parametrize("case", CASES)
def test_torch_native_matmul(timed, case):
    timed(torch_native_matmul, *make_inputs(*CASES[case]))


@triton_on_gpu
@pytest.mark.parametrize("case", CASES)
def test_triton(timed, case):
    from echox_kernels.head_select import head_select
    args = make_inputs(*CASES[case])
    assert torch.equal(head_select(*args), torch_reference(*args)), "Triton picked another row than the reference"
    timed(head_select, *args)


@cuda_built
@pytest.mark.parametrize("case", CASES)
def test_cuda(timed, case):
    args = make_inputs(*CASES[case])
    cuda = functools.partial(sampling.head_select, backend_name="cuda")  # echox_cuda, as the engine calls it
    assert torch.equal(cuda(*args), torch_reference(*args)), "CUDA picked another row than the reference"
    timed(cuda, *args)
