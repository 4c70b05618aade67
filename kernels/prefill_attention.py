"""Causal prefill attention over a static KV cache, flash-attention style, in Triton.

Contract: exactly `echox.attention.cached_attention_reference`. T new queries q [B, Hq, T, D],
query t of sequence b at position positions[b, t], attend to the cached keys s <= positions[b, t]
whose key_valid[b, s] is set (key_valid carries the eot key-masking quirk of SPEC §5), with GQA
(Hq a multiple of Hkv), scale D**-0.5, fp32 softmax and accumulation, output in q's dtype.

Each program owns one tile of BLOCK_M queries of one q head and walks the key tiles from 0 with an
online softmax (running max m, sum l, unnormalised output acc per query row):
    m' = max(m, max_s x_s),  l' = 2^(m - m') l + sum_s 2^(x_s - m'),  acc' = 2^(m - m') acc + P V.
Positions are read per query row, so the kernel holds for any positions tensor; the walk stops
after the key tile holding the tile's largest position, since later keys are hidden from every
row. In a real prefill positions run start..start+T-1 over a cache filled up to start, so the
keys before start (earlier turns) are all visible and the diagonal tiles carry the causal mask.
A key that is masked (an eot) scores -inf, so a key tile of masked keys adds nothing.

Assumption: every query row sees at least one key (BOS at position 0 is always valid), so the
softmax denominator is never zero. A row with no visible key gives NaN here (torch 2.13's SDPA gives 0).
"""

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_step
from .sm_count import sm_count

_NO_SCORE = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: keeps 2^(m_old - m_new) NaN-free
LOG2_E = 1.4426950408889634


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, key_valid_ptr, out_ptr,  # q, out [B, Hq, T, D]; k, v [B, Hkv, S, D]
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ot, stride_pos_b, stride_pos_t, stride_valid_b, stride_valid_s,
    q_heads, num_queries, cache_len, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq_head = tl.program_id(0)  # b * Hq + q head: the heads of one query tile run side by side and share K/V in L2
    # Later query tiles see more keys: launch them first so the short ones fill the tail of the grid.
    query_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = seq_head // q_heads
    q_head = seq_head % q_heads
    kv_head = q_head // GROUP
    t = query_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    is_query = t < num_queries
    d = tl.arange(0, HEAD_DIM)
    query_pos = tl.load(positions_ptr + b * stride_pos_b + t * stride_pos_t, mask=is_query, other=0).to(tl.int32)
    q = tl.load(q_ptr + b * stride_qb + q_head * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=is_query[:, None], other=0.0)  # [BLOCK_M, D]
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    key_end = tl.minimum(tl.max(query_pos, axis=0) + 1, cache_len)  # keys at or past it are hidden from all rows
    run_max = tl.full([BLOCK_M], _NO_SCORE, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile in range(0, key_end, BLOCK_N):
        s = tile + tl.arange(0, BLOCK_N)
        in_range = s < key_end
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=in_range[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=in_range[:, None], other=0.0)
        key_ok = tl.load(key_valid_ptr + b * stride_valid_b + s * stride_valid_s, mask=in_range, other=0) != 0
        visible = key_ok[None, :] & (s[None, :] <= query_pos[:, None])  # [BLOCK_M, BLOCK_N]
        run_max, run_sum, acc = online_softmax_step(
            q, k, v, visible, run_max, run_sum, acc, scale_log2, DOT_PRECISION)
    out = acc / run_sum[:, None]
    tl.store(out_ptr + b * stride_ob + q_head * stride_oh + t[:, None] * stride_ot + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=is_query[:, None])


def tile_plan(head_dim: int, dtype: torch.dtype, num_queries: int = 0, seq_heads: int = 0, sms: int = 0) -> dict:
    """Tile sizes and launch shape. 16-bit tiles of 128 queries keep an H100's tensor cores busy
    with 8 warps; fp32 K/V tiles are twice the bytes, so they get smaller tiles and fewer stages.
    Given the grid (num_queries over seq_heads = B * Hq) and the SM count, a short prompt gets
    smaller query tiles (down to 32) until the grid has a program per SM: T = 256 at EchoX-8B's
    32 heads is 64 tiles of 128 queries for 132 SMs, and 256 tiles of 32."""
    if dtype == torch.float32 or head_dim < 128:
        plan = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    else:
        plan = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    while plan["BLOCK_M"] > 32 and seq_heads * triton.cdiv(num_queries, plan["BLOCK_M"]) < sms:
        plan["BLOCK_M"] //= 2
        plan["num_warps"] = 4
    return plan


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, S, D]; positions [B, T] int; key_valid [B, S] bool
    -> [B, Hq, T, D] in q's dtype (and q's memory layout). Caches may be slices of a longer cache."""
    batch, q_heads, num_queries, head_dim = q.shape
    kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    assert q_heads % kv_heads == 0, f"q heads {q_heads} must be a multiple of kv heads {kv_heads}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: need a power of two >= 16"
    assert q.stride(3) == k_cache.stride(3) == v_cache.stride(3) == 1, "the head dim must be contiguous"
    out = torch.empty_like(q)  # keeps q's strides: [B, T, Hq, D] in memory when q is a transposed projection
    # In the interpreter (no SM count) the fewest, largest tiles run fastest.
    plan = tile_plan(head_dim, q.dtype, num_queries, batch * q_heads, sm_count(q.device) or 0)
    block_m = plan.pop("BLOCK_M")
    # fp32 caches must not be rounded to tf32 inside tl.dot; fp16/bf16 use the tensor cores as is.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (batch * q_heads, triton.cdiv(num_queries, block_m))
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, positions, key_valid, out,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        positions.stride(0), positions.stride(1), key_valid.stride(0), key_valid.stride(1),
        q_heads, num_queries, cache_len, head_dim ** -0.5 * LOG2_E,
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, DOT_PRECISION=precision, **plan)
    return out
