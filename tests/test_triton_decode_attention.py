"""The Triton decode-attention kernel against `decode_attention_reference` (interpreter on CPU)."""

import pytest
import torch

from echox.attention import decode_attention_reference
from echox_kernels.decode_attention import BLOCK_N, decode_attention, split_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (Hq, Hkv, D): EchoX-8B, EchoX-3B, echo decoders (8 x 768, 6 x 512) and the tiny test model.
HEAD_SHAPES = [(32, 8, 128), (24, 8, 128), (12, 12, 64), (8, 8, 64), (4, 2, 16)]


def make_inputs(q_heads, kv_heads, dim, cache_len, lengths, dtype, seed=0):
    """Random q/k/v, per-row lengths, and key_valid with holes (the eot quirk) but BOS valid."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    q = torch.randn(batch, q_heads, dim, generator=gen)
    k = torch.randn(batch, kv_heads, cache_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, cache_len, dim, generator=gen)
    key_valid = torch.rand(batch, cache_len, generator=gen) > 0.2
    key_valid[:, 0] = True
    lengths = torch.tensor(lengths, dtype=torch.int64)
    return [t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), lengths, key_valid)]


@pytest.mark.parametrize("q_heads,kv_heads,dim", HEAD_SHAPES)
def test_matches_reference_fp32(q_heads, kv_heads, dim):
    cache_len = 3 * BLOCK_N + 8  # several splits and a ragged last tile
    args = make_inputs(q_heads, kv_heads, dim, cache_len, [cache_len, 70, 1], torch.float32)
    torch.testing.assert_close(decode_attention(*args), decode_attention_reference(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(4, 2, 16), (24, 8, 128)])
def test_matches_reference_fp16(q_heads, kv_heads, dim):
    args = make_inputs(q_heads, kv_heads, dim, 2 * BLOCK_N + 5, [2 * BLOCK_N + 5, 33], torch.float16, seed=1)
    out = decode_attention(*args)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, decode_attention_reference(*args), atol=2e-3, rtol=2e-3)


def test_keys_past_length_and_masked_keys_are_ignored():
    q, k, v, lengths, key_valid = make_inputs(4, 2, 16, 2 * BLOCK_N, [40, 100], torch.float32, seed=2)
    before = decode_attention(q, k, v, lengths, key_valid)
    rows = torch.arange(2 * BLOCK_N, device=DEVICE)
    hidden = (rows[None, :] >= lengths[:, None]) | ~key_valid  # [B, S]: keys no query may see
    k = k.masked_fill(hidden[:, None, :, None], 1e4)
    v = v.masked_fill(hidden[:, None, :, None], 1e4)
    torch.testing.assert_close(decode_attention(q, k, v, lengths, key_valid), before)


def test_split_plan_covers_the_cache_from_shapes_only():
    for batch, kv_heads, cache_len in [(1, 8, 4096), (1, 12, 2048), (8, 8, 131072), (1, 2, 5)]:
        num_splits, split_len = split_plan(batch, kv_heads, cache_len)
        assert split_len % BLOCK_N == 0
        assert (num_splits - 1) * split_len < cache_len <= num_splits * split_len


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads,kv_heads,dim", HEAD_SHAPES[:3])
def test_large_bf16_cache_on_gpu(q_heads, kv_heads, dim):
    args = make_inputs(q_heads, kv_heads, dim, 4096, [4096, 1500, 3], torch.bfloat16, seed=3)
    torch.testing.assert_close(decode_attention(*args), decode_attention_reference(*args), atol=2e-2, rtol=2e-2)
