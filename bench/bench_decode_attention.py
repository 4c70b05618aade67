"""Decode attention: the Triton and CUDA kernels vs the torch reference, SDPA and flash-attn (if present).

CUDA: bf16 at EchoX-8B (32/8 x 128) and 3B (24/8 x 128) LLM shapes and the 8B echo decoder
(12/12 x 64), a 4096-key static cache filled to 1024 or 4096. CPU: fp32 tiny and mid shapes.
The kernels stop at `lengths`; the torch baselines are given the filled part of the cache only
(as echox/attention.py's CPU path slices it), so every implementation reads the same keys.
"""

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from echox import attention
from echox.attention import decode_attention_reference
from echox.backend import cuda_extension_available

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# On CPU Triton runs only in the interpreter, whose timings say nothing about the kernel.
triton_on_gpu = pytest.mark.skipif(not HAS_GPU, reason="Triton is timed on CUDA only")
cuda_built = pytest.mark.skipif(not (HAS_GPU and cuda_extension_available()), reason="echox_cuda is not built")

# name: (B, Hq, Hkv, D, cache length S, filled length)
SHAPES = {
    "8b-1k": (1, 32, 8, 128, 4096, 1024), "8b-4k": (1, 32, 8, 128, 4096, 4096),
    "3b-1k": (1, 24, 8, 128, 4096, 1024), "echo-8x768": (1, 12, 12, 64, 2048, 300),
} if HAS_GPU else {"tiny": (1, 4, 2, 16, 256, 200), "mid": (1, 8, 8, 64, 1024, 700)}
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32


def make_inputs(batch, q_heads, kv_heads, dim, cache_len, filled):
    q = torch.randn(batch, q_heads, dim, device=DEVICE, dtype=DTYPE)
    k = torch.randn(batch, kv_heads, cache_len, dim, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    lengths = torch.full((batch,), filled, device=DEVICE, dtype=torch.int64)
    key_valid = torch.ones(batch, cache_len, device=DEVICE, dtype=torch.bool)
    key_valid[:, 5] = False  # one masked eot, as in a real prompt
    return q, k, v, lengths, key_valid


def filled_part(q, k, v, lengths, key_valid):
    """The inputs with the cache cut to its filled length: what a torch baseline has to read."""
    used = int(lengths.max())
    return q, k[:, :, :used], v[:, :, :used], lengths, key_valid[:, :used]


def sdpa(q, k, v, lengths, key_valid):
    """The baseline the engine would use without a kernel: SDPA with a boolean mask."""
    visible = (torch.arange(k.shape[2], device=k.device)[None, :] < lengths[:, None]) & key_valid
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=visible[:, None, None],
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, 0]


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_reference(timed, shape):
    timed(decode_attention_reference, *filled_part(*make_inputs(*SHAPES[shape])))


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_sdpa(timed, shape):
    timed(sdpa, *filled_part(*make_inputs(*SHAPES[shape])))


@triton_on_gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_triton(timed, shape):
    from echox_kernels.decode_attention import decode_attention
    args = make_inputs(*SHAPES[shape])
    torch.testing.assert_close(decode_attention(*args), decode_attention_reference(*args), atol=2e-2, rtol=2e-2)
    timed(decode_attention, *args)


@cuda_built
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda(timed, shape):
    args = make_inputs(*SHAPES[shape])
    cuda = functools.partial(attention.decode_attention, backend_name="cuda")  # echox_cuda, as the engine calls it
    torch.testing.assert_close(cuda(*args), decode_attention_reference(*args), atol=2e-2, rtol=2e-2)
    timed(cuda, *args)


@pytest.mark.parametrize("shape", SHAPES)
def test_flash_attn_with_kvcache(timed, shape):
    """Baseline only: flash-attn has no per-key mask, so the eot hole is ignored here."""
    if not HAS_GPU or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not importable (or no GPU)")
    from flash_attn import flash_attn_with_kvcache
    q, k, v, lengths, _ = make_inputs(*SHAPES[shape])
    # flash-attn wants [B, S, H, D] caches and int32 lengths.
    timed(flash_attn_with_kvcache, q[:, None], k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
          None, None, None, None, lengths.int())
