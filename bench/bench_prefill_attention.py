"""Prefill attention: the Triton kernel vs the torch reference (SDPA with a bool mask) and flash-attn.

CUDA: bf16 at EchoX-8B LLM shapes (32/8 x 128), a prompt of T = 256 or 1024 tokens prefilled into an
empty cache (S = T keys). CPU: fp32 tiny and mid shapes, torch only.
"""

import importlib.util

import pytest
import torch

from echox.attention import cached_attention_reference

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# On CPU Triton runs only in the interpreter, whose timings say nothing about the kernel.
triton_on_gpu = pytest.mark.skipif(not HAS_GPU, reason="Triton is timed on CUDA only")

# name: (B, Hq, Hkv, D, queries T); the cache holds exactly the T new keys (S = T).
SHAPES = {
    "8b-t256": (1, 32, 8, 128, 256), "8b-t1024": (1, 32, 8, 128, 1024),
} if HAS_GPU else {"tiny": (1, 4, 2, 16, 64), "mid": (1, 8, 8, 64, 256)}
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32


def make_inputs(batch, q_heads, kv_heads, dim, num_queries):
    q = torch.randn(batch, num_queries, q_heads, dim, device=DEVICE, dtype=DTYPE).transpose(1, 2)  # as llama.py
    k = torch.randn(batch, kv_heads, num_queries, dim, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    positions = torch.arange(num_queries, device=DEVICE)[None].expand(batch, -1)
    key_valid = torch.ones(batch, num_queries, device=DEVICE, dtype=torch.bool)
    key_valid[:, 5] = False  # one masked eot, as in a real prompt
    return q, k, v, positions, key_valid


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_reference(timed, shape):
    timed(cached_attention_reference, *make_inputs(*SHAPES[shape]))


@triton_on_gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_triton(timed, shape):
    from echox_kernels.prefill_attention import prefill_attention
    args = make_inputs(*SHAPES[shape])
    torch.testing.assert_close(prefill_attention(*args), cached_attention_reference(*args), atol=2e-2, rtol=2e-2)
    timed(prefill_attention, *args)


@pytest.mark.parametrize("shape", SHAPES)
def test_flash_attn_causal(timed, shape):
    """Baseline only: flash-attn has no per-key mask, so the eot hole is ignored here."""
    if not HAS_GPU or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not importable (or no GPU)")
    from flash_attn import flash_attn_func
    q, k, v, _, _ = make_inputs(*SHAPES[shape])
    # flash-attn wants [B, T, H, D] (q already is that in memory); then dropout 0, default scale, causal.
    timed(flash_attn_func, q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
          0.0, None, True)
