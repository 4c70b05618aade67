"""The Triton decode-attention kernel against `decode_attention_reference` (interpreter on CPU)."""

import pytest
import torch

from echox.attention import decode_attention_reference
from echox_kernels.decode_attention import BLOCK_N, MIN_TILES_PER_SPLIT, decode_attention, split_plan

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
    cache_len = 2 * MIN_TILES_PER_SPLIT * BLOCK_N + 8  # two splits and a ragged last tile
    assert split_plan(3, kv_heads, cache_len)[0] == 2
    args = make_inputs(q_heads, kv_heads, dim, cache_len, [cache_len, 70, 1], torch.float32)
    torch.testing.assert_close(decode_attention(*args), decode_attention_reference(*args), atol=1e-4, rtol=1e-4)


def test_lengths_may_be_a_strided_view():
    q, k, v, lengths, key_valid = make_inputs(4, 2, 16, 3 * BLOCK_N + 8, [70, 5, 1], torch.float32)
    strided = torch.stack([lengths, lengths * 0 + 2], dim=1)[:, 0]  # every other int64, as a column of [B, 2]
    assert strided.stride(0) == 2
    torch.testing.assert_close(decode_attention(q, k, v, strided, key_valid),
                               decode_attention_reference(q, k, v, lengths, key_valid), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(4, 2, 16), (12, 12, 64)])
def test_single_split_writes_the_output_itself(q_heads, kv_heads, dim):
    cache_len = 3 * BLOCK_N + 8
    assert split_plan(2, kv_heads, cache_len)[0] == 1
    args = make_inputs(q_heads, kv_heads, dim, cache_len, [cache_len, 70], torch.float32, seed=4)
    torch.testing.assert_close(decode_attention(*args), decode_attention_reference(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_len", [3 * BLOCK_N + 8, 2 * MIN_TILES_PER_SPLIT * BLOCK_N + 8], ids=["one-split", "splits"])
def test_lengths_past_the_cache_are_clamped(cache_len):
    """A length beyond the cache (a caller's off-by-one) reads the whole cache and nothing past it."""
    args = make_inputs(4, 2, 16, cache_len, [cache_len + 100, 2 ** 31 - 1], torch.float32, seed=5)
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


@pytest.mark.parametrize("sms", [132, 78])  # H100 / H200 SXM, and a smaller part
def test_split_plan_pipelines_each_split_and_keeps_partials_small(sms):
    """EchoX-8B at a 4096-key cache: each split runs >= MIN_TILES_PER_SPLIT key tiles (one 64-key
    tile per split left the pipeline idle and made the partials 13% of the K/V traffic), the grid
    still has at least one program per SM where the cache allows, and the partials stay under 5%."""
    batch, q_heads, kv_heads, dim, cache_len = 1, 32, 8, 128, 4096
    num_splits, split_len = split_plan(batch, kv_heads, cache_len, sms)
    assert split_len >= MIN_TILES_PER_SPLIT * BLOCK_N
    assert batch * kv_heads * num_splits >= min(sms, batch * kv_heads * cache_len // (MIN_TILES_PER_SPLIT * BLOCK_N))
    kv_bytes = 2 * batch * kv_heads * cache_len * dim * 2  # bf16 K and V
    partial_bytes = 2 * batch * q_heads * num_splits * (dim + 2) * 4  # written, then read by the combine
    assert partial_bytes < 0.05 * kv_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads,kv_heads,dim", HEAD_SHAPES[:3])
def test_large_bf16_cache_on_gpu(q_heads, kv_heads, dim):
    args = make_inputs(q_heads, kv_heads, dim, 4096, [4096, 1500, 3], torch.bfloat16, seed=3)
    torch.testing.assert_close(decode_attention(*args), decode_attention_reference(*args), atol=2e-2, rtol=2e-2)
