"""Decode attention over a static KV cache, split along the cache (flash-decoding), in Triton.

Contract: exactly `echox.attention.decode_attention_reference`. One query per sequence,
q [B, Hq, D], attends to the cached keys s < lengths[b] whose key_valid[b, s] is set
(key_valid carries the eot key-masking quirk), with GQA (Hq a multiple of Hkv), scale D**-0.5,
fp32 softmax and accumulation, output in q's dtype.

Why split: at batch 1 there are only B * Hkv (kv head) programs, far too few to fill a GPU
whose time goes into streaming K and V. So the cache length is cut into splits; kernel 1 gives
each (sequence, kv head, split) a program that computes a partial softmax (running max m,
sum l, unnormalised output acc) for all q heads of that kv head at once, so each K/V tile is
read once per group. Kernel 2 merges the splits of each q head with the log-sum-exp rule:
    M = max_s m_s,  out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
Splits that start at or past lengths[b] return at once and are skipped by the combine, so a
short sequence in a long static cache costs little. The split count depends on shapes and the
SM count only, never on `lengths` (no host sync; the launch is CUDA-graph capturable): about
two programs per SM, but at least MIN_TILES_PER_SPLIT key tiles per split, so that each program's
loop runs through the software pipeline and the partials stay a few percent of the K/V bytes.
Where that leaves one split (short caches, large batches), kernel 1 normalises and writes the
output itself and kernel 2 is not launched. Lengths are clamped to 0..S, as the CUDA kernel does.

Assumption: every row has at least one visible key (BOS is always valid), so the softmax
denominator is never zero. A row with no visible key would give NaN, as the reference does.
"""

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_step
from .sm_count import H100_SMS, sm_count

BLOCK_N = 64  # keys per tile
PROGRAMS_PER_SM = 2  # (sequence, kv head, split) programs per SM
MIN_TILES_PER_SPLIT = 4  # key tiles per split, where the cache has that many
MAX_SPLITS = 128  # bounds the combine's tile of partials
_NO_SCORE = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: keeps 2^(m_old - m_new) NaN-free


@triton.jit
def _visible_length(lengths_ptr, b, cache_len):
    """lengths[b] clamped to the cache: a longer one must not read past the cache's end."""
    return tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), cache_len).to(tl.int32)


@triton.jit
def _split_partials_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, key_valid_ptr,  # q [B, Hq, D]; k, v [B, Hkv, S, D]; [B]; [B, S]
    part_max_ptr, part_sum_ptr, part_acc_ptr,  # [B * Hq, NS], [B * Hq, NS], [B * Hq, NS, D] fp32
    out_ptr,  # [B, Hq, D]: written here when there is a single split
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_valid_b, stride_ob, stride_oh, kv_heads, cache_len, num_splits, split_len, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    seq_head = tl.program_id(0)  # b * Hkv + kv head
    split = tl.program_id(1)
    b = seq_head // kv_heads
    kv_head = seq_head % kv_heads
    length = _visible_length(lengths_ptr, b, cache_len)
    start = split * split_len
    if start < length:
        end = tl.minimum(start + split_len, length)
        g = tl.arange(0, BLOCK_G)  # q heads of this kv head, padded to a tl.dot-sized block
        d = tl.arange(0, HEAD_DIM)
        q_head = kv_head * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + q_head[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)  # [BLOCK_G, D]
        k_base = k_ptr + b * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh
        run_max = tl.full([BLOCK_G], _NO_SCORE, tl.float32)
        run_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for tile in range(start, end, BLOCK_N):
            n = tile + tl.arange(0, BLOCK_N)
            in_range = n < end
            k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=in_range[:, None], other=0.0)
            visible = tl.load(key_valid_ptr + b * stride_valid_b + n, mask=in_range, other=0) != 0
            run_max, run_sum, acc = online_softmax_step(
                q, k, v, visible[None, :], run_max, run_sum, acc, scale_log2, DOT_PRECISION)
        is_head = g < GROUP
        if SINGLE_SPLIT:  # this program saw every key: normalise here, no combine launch
            tl.store(out_ptr + b * stride_ob + q_head[:, None] * stride_oh + d[None, :],
                     (acc / run_sum[:, None]).to(out_ptr.dtype.element_ty), mask=is_head[:, None])
        else:
            row = (b * kv_heads * GROUP + q_head) * num_splits + split  # [BLOCK_G] into [B * Hq, NS]
            tl.store(part_max_ptr + row, run_max, mask=is_head)
            tl.store(part_sum_ptr + row, run_sum, mask=is_head)
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=is_head[:, None])


@triton.jit
def _combine_splits_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr, lengths_ptr, out_ptr,  # partials as above; out [B, Hq, D]
    stride_ob, stride_oh, q_heads, cache_len, num_splits, split_len,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq_qhead = tl.program_id(0)  # b * Hq + q head
    b = seq_qhead // q_heads
    q_head = seq_qhead % q_heads
    live_splits = tl.cdiv(_visible_length(lengths_ptr, b, cache_len), split_len)  # the others never wrote
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    live = s < live_splits
    row = seq_qhead * num_splits + s
    split_max = tl.load(part_max_ptr + row, mask=live, other=float("-inf"))
    split_sum = tl.load(part_sum_ptr + row, mask=live, other=0.0)
    split_acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    weight = tl.exp2(split_max - tl.max(split_max, axis=0))  # [BLOCK_S]; 0 for dead splits
    total = tl.sum(weight * split_sum, axis=0)
    out = tl.sum(weight[:, None] * split_acc, axis=0) / total  # [D]
    tl.store(out_ptr + b * stride_ob + q_head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def split_plan(batch: int, kv_heads: int, cache_len: int, sms: int = H100_SMS) -> tuple[int, int]:
    """(number of splits, keys per split) from shapes and the SM count only."""
    tiles = triton.cdiv(cache_len, BLOCK_N)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, batch * kv_heads)
    wanted = max(1, min(wanted, MAX_SPLITS, tiles // MIN_TILES_PER_SPLIT))
    split_len = triton.cdiv(tiles, wanted) * BLOCK_N
    return triton.cdiv(cache_len, split_len), split_len


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D]; k_cache, v_cache [B, Hkv, S, D]; lengths [B] int; key_valid [B, S] bool -> [B, Hq, D]."""
    batch, q_heads, head_dim = q.shape
    kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    assert q_heads % kv_heads == 0, f"q heads {q_heads} must be a multiple of kv heads {kv_heads}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: need a power of two >= 16"
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "the head dim must be contiguous"
    key_valid, lengths = key_valid.contiguous(), lengths.contiguous()  # both read as dense rows
    group = q_heads // kv_heads
    num_splits, split_len = split_plan(batch, kv_heads, cache_len, sm_count(q.device) or H100_SMS)  # interpreter: the GPU's plan
    part_max = torch.empty(batch * q_heads, num_splits, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch * q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    # fp32 caches must not be rounded to tf32 inside tl.dot; fp16/bf16 use the tensor cores as is.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_partials_kernel[(batch * kv_heads, num_splits)](
        q, k_cache, v_cache, lengths, key_valid, part_max, part_sum, part_acc, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), key_valid.stride(0), out.stride(0), out.stride(1),
        kv_heads, cache_len, num_splits, split_len, head_dim ** -0.5 * 1.4426950408889634,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        DOT_PRECISION=precision, SINGLE_SPLIT=num_splits == 1, num_warps=4, num_stages=2)
    if num_splits > 1:
        _combine_splits_kernel[(batch * q_heads,)](
            part_max, part_sum, part_acc, lengths, out, out.stride(0), out.stride(1), q_heads, cache_len,
            num_splits, split_len, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out
