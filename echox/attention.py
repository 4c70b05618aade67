"""Attention over a static KV cache: the torch references and the dispatch for prefill and decode.

The cache holds, per sequence b and position s, a key/value pair and a flag `key_valid[b, s]`.
A query at position p sees the keys s <= p whose flag is set. The flag carries the eot quirk of
SPEC §5: the released model masks every `<|eot_id|>` already in the prompt as a key, while the
positions keep counting 0..L-1.
"""

import torch
import torch.nn.functional as F

from . import backend


def visible_keys(positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, T, S] bool: which cached keys each query position may attend to."""
    key_index = torch.arange(key_valid.shape[1], device=key_valid.device)
    return (key_index[None, None, :] <= positions[:, :, None]) & key_valid[:, None, :]


def cached_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Attention of T new queries over the whole cache (prefill; also the decode reference).

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, S, D]; positions [B, T]; key_valid [B, S].
    Returns [B, Hq, T, D]. Scores and softmax in fp32 are left to SDPA's own accumulation.
    """
    mask = visible_keys(positions, key_valid)[:, None]  # [B, 1, T, S]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k_cache.shape[1])


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     key_valid: torch.Tensor, backend_name: str | None = None) -> torch.Tensor:
    """Prefill attention through the dispatch: the SDPA reference or the Triton kernel."""
    # There is no CUDA prefill kernel: on a GPU the Triton kernel runs unless torch is asked for.
    if backend.choose("prefill_attention", q, backend_name, kernels=("triton",)) == "triton":
        from echox_kernels.prefill_attention import prefill_attention as kernel
        return kernel(q, k_cache, v_cache, positions, key_valid)
    return cached_attention_reference(q, k_cache, v_cache, positions, key_valid)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] attends to keys s < lengths[b] with key_valid[b, s].

    The definition every decode-attention kernel is tested against: fp32 math, output in q's dtype.
    """
    batch, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    qf = q.float().view(batch, kv_heads, group, dim)
    scores = (qf @ k_cache.float().transpose(-1, -2)) * dim ** -0.5  # [B, Hkv, group, S]
    key_index = torch.arange(k_cache.shape[2], device=q.device)
    allowed = (key_index[None, :] < lengths[:, None]) & key_valid  # [B, S]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ v_cache.float()  # [B, Hkv, group, D]
    return out.reshape(batch, q_heads, dim).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, key_valid: torch.Tensor, backend_name: str | None = None) -> torch.Tensor:
    """Decode attention through the dispatch: torch reference, Triton or CUDA kernel."""
    which = backend.choose("decode_attention", q, backend_name)
    if which == "torch" and not q.is_cuda:
        # On the CPU reading only the used part of the static cache pays. The bound stays a tensor,
        # so a TorchScript trace of the step (capture.py) slices by each call's lengths.
        used = lengths.max()
        k_cache, v_cache, key_valid = k_cache[:, :, :used], v_cache[:, :, :used], key_valid[:, :used]
    if which == "triton":
        from echox_kernels.decode_attention import decode_attention as kernel
        return kernel(q, k_cache, v_cache, lengths, key_valid)
    if which == "cuda":
        import echox_cuda
        # The kernel reads q as dense rows; a batch's q is a strided view of the rotated q and k heads.
        return echox_cuda.decode_attention(q.contiguous(), k_cache, v_cache, lengths, key_valid)
    return decode_attention_reference(q, k_cache, v_cache, lengths, key_valid)
