"""The Llama decoder shared by the LLM and the echo decoder (T2U).

RMSNorm, RoPE with Llama-3 frequency scaling in the Hugging Face "rotate half" layout, grouped
query attention over a preallocated static KV cache, SwiGLU. q/k/v and gate/up are each fused
into one matmul; the released separate weights are concatenated at load.

`forward(x, positions, key_valid)` runs T new embeddings (a prefill, or T = 1 for a decode
step) and returns the final-norm hidden states. It has no data-dependent Python branches and
no host syncs, so the decode step can be captured (capture.py: a CUDA graph or a trace).
"""

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import cached_attention, cached_attention_reference, decode_attention
from .config import LlamaConfig, RopeScaling
from .weights import Layout, embedding_table


def set_weight(module: nn.Module, tensor: torch.Tensor):
    """Install a loaded tensor as `module.weight` (works on modules built on the meta device)."""
    module.weight = nn.Parameter(tensor, requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order of the released (HF) model.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, with Llama-3 scaling of the long wavelengths."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    slowed = inv_freq / scaling.factor
    # Between the two cut-offs, blend linearly in 1/wavelength from slowed to unchanged.
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * slowed + smooth * inv_freq
    scaled = torch.where(wavelen > old / scaling.low_freq_factor, slowed, inv_freq)
    is_medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return torch.where(is_medium, blended, scaled)


def rope_tables(cfg: LlamaConfig, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [max_len, head_dim] in fp32; each frequency appears twice (rotate-half
    layout), and the sine's first half is negated (see apply_rope)."""
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().to(device), torch.cat([-sin, sin], dim=-1).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, signed sin [B, T, D]. The rotation pairs element i with i + D/2:
    rotate_half(x) * sin = (-x2, x1) * sin = (x2, x1) * (-sin, sin), the same bits in one roll."""
    xf = x.float()
    return (xf * cos[:, None] + xf.roll(x.shape[-1] // 2, dims=-1) * sin[:, None]).to(x.dtype)


class KVCache(nn.Module):
    """Keys/values [B, Hkv, S, D] plus the per-position key flag [B, S], preallocated once."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("key_valid", key_valid, persistent=False)

    @classmethod
    def zeros(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    def rows(self, start: int, stop: int) -> "KVCache":
        """Sequences start..stop-1 as a cache of their own that shares this one's memory."""
        return KVCache(self.k[start:stop], self.v[start:stop], self.key_valid[start:stop])

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor):
        """Write k, v [B, Hkv, T, D] and key_valid [B, T] at positions [B, T]."""
        at = positions[:, None, :, None].expand(k.shape)  # [B, Hkv, T, D]: where each value goes
        self.k.scatter_(2, at, k)
        self.v.scatter_(2, at, v)
        self.key_valid.scatter_(1, positions, key_valid)


@dataclass
class DecoderState:
    caches: list[KVCache]
    rope_cos: torch.Tensor  # [max_len, D] fp32
    rope_sin: torch.Tensor

    def rows(self, start: int, stop: int) -> "DecoderState":
        """Sequences start..stop-1 of every layer's cache, sharing memory (a batch's KV slots)."""
        return DecoderState([cache.rows(start, stop) for cache in self.caches], self.rope_cos, self.rope_sin)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, positions, key_valid, kv_len=None):
        batch, length, _ = x.shape
        q_size, qk_heads = self.heads * self.head_dim, self.heads + self.kv_heads
        qkv = self.wqkv(x).view(batch, length, qk_heads + self.kv_heads, self.head_dim).transpose(1, 2)
        # One rotation for the query and key heads (elementwise: the same bits as one call each).
        q, k = apply_rope(qkv[:, :qk_heads], cos, sin).split([self.heads, self.kv_heads], dim=1)
        v = qkv[:, qk_heads:]
        cache = self.cache
        if cache is None:  # whole sequences with gradients (training): their own keys are all the keys
            out = cached_attention_reference(q, k, v, positions, key_valid)
            return self.wo(out.transpose(1, 2).reshape(batch, length, q_size))
        cache.update(positions, k, v, key_valid)
        if length == 1:
            out = decode_attention(q[:, :, 0], cache.k, cache.v, positions[:, 0] + 1, cache.key_valid)[:, :, None]
        else:
            end = cache.k.shape[2] if kv_len is None else kv_len  # a prefill need not scan the whole cache
            out = cached_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], positions, cache.key_valid[:, :end])
        return self.wo(out.transpose(1, 2).reshape(batch, length, q_size))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, positions, key_valid, kv_len=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, key_valid, kv_len)
        return x + self.ffn(self.ffn_norm(x))


def body_layout(cfg: LlamaConfig, prefix: str) -> Layout:
    """Released (Hugging Face) key names and shapes of the decoder layers and final norm."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    layout: Layout = {}
    for i in range(cfg.num_layers):
        p = f"{prefix}layers.{i}."
        layout |= {
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    layout[prefix + "norm.weight"] = (h,)
    return layout


class LlamaBody(nn.Module):
    """Decoder layers and final norm: embeddings in, final-norm hidden states out."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # The layers point at one state at a time: a thread that points them and runs on that
        # state while other threads may point them elsewhere holds this lock for both.
        self.state_lock = threading.Lock()

    def allocate_state(self, batch: int, max_len: int) -> "DecoderState":
        """A KV cache per layer and RoPE tables for `max_len` positions, owned by the caller (a
        conversation), so that several conversations can share one set of weights."""
        weight = self.layers[0].attention.wqkv.weight
        caches = [KVCache.zeros(batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim, weight.dtype, weight.device)
                  for _ in self.layers]
        return DecoderState(caches, *rope_tables(self.cfg, max_len, weight.device))

    def use_state(self, state: "DecoderState"):
        """Point every layer at `state`'s buffers (no copy): the next forward reads and writes them."""
        for layer, cache in zip(self.layers, state.caches):
            layer.attention.cache = cache
        self.rope_cos, self.rope_sin = state.rope_cos, state.rope_sin

    def setup_cache(self, batch: int, max_len: int):
        """Allocate a fresh state and use it; every later step reuses its static buffers."""
        self.use_state(self.allocate_state(batch, max_len))

    @property
    def max_len(self) -> int:
        return self.rope_cos.shape[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                kv_len: int | None = None) -> torch.Tensor:
        """x [B, T, H] at positions [B, T], key_valid [B, T] bool -> final-norm hidden [B, T, H].

        kv_len (optional, T > 1): the last position + 1, so a prefill reads only the cache it needs.
        """
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer in self.layers:
            x = layer(x, cos, sin, positions, key_valid, kv_len)
        return self.norm(x)

    def forward_sequences(self, x: torch.Tensor, key_valid: torch.Tensor,
                          checkpointed: bool = False) -> torch.Tensor:
        """Whole sequences with gradients, for training: x [B, T, H] at positions 0..T-1, key_valid
        [B, T] bool -> final-norm hidden [B, T, H]. No KV cache is used (the layers must not hold one);
        a query sees the valid keys at or before it, exactly as a cached prefill would. Padding goes
        on the right, so every query still sees position 0. `checkpointed` recomputes each layer's
        activations in the backward pass instead of storing them."""
        batch, length, _ = x.shape
        cos, sin = rope_tables(self.cfg, length, x.device)
        positions = torch.arange(length, device=x.device).expand(batch, length)
        cos, sin = cos[positions], sin[positions]
        for layer in self.layers:
            if checkpointed:
                x = checkpoint(layer, x, cos, sin, positions, key_valid, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, key_valid)
        return self.norm(x)

    def released_tensors(self) -> dict[str, torch.Tensor]:
        """The weights named as in `body_layout(cfg, prefix="")`: the inverse of `load_released`,
        splitting the fused q/k/v and gate/up matrices again."""
        cfg, tensors = self.cfg, {}
        sizes = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            attn, ffn = layer.attention, layer.ffn
            q, k, v = attn.wqkv.weight.detach().split(sizes)
            gate, up = ffn.w_gate_up.weight.detach().chunk(2)
            tensors |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                        p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": attn.wo.weight.detach(),
                        p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                        p + "mlp.down_proj.weight": ffn.w_down.weight.detach(),
                        p + "input_layernorm.weight": layer.attention_norm.weight.detach(),
                        p + "post_attention_layernorm.weight": layer.ffn_norm.weight.detach()}
        return tensors | {"norm.weight": self.norm.weight.detach()}

    def load_released(self, tensors: dict[str, torch.Tensor], prefix: str = ""):
        """Install weights named as in `body_layout(cfg, prefix)`, fusing q/k/v and gate/up.
        Consumes them: each is taken out of `tensors` as it is installed, so a layer's separate q,
        k, v, gate and up go as soon as their fused copies exist (not at the end, which held the
        whole model twice over at its peak); the caller's other keys stay."""
        for i, layer in enumerate(self.layers):
            p = f"{prefix}layers.{i}."
            attn, ffn = layer.attention, layer.ffn
            set_weight(attn.wqkv, torch.cat([tensors.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
            set_weight(attn.wo, tensors.pop(p + "self_attn.o_proj.weight"))
            set_weight(ffn.w_gate_up, torch.cat([tensors.pop(p + "mlp.gate_proj.weight"),
                                                 tensors.pop(p + "mlp.up_proj.weight")]))
            set_weight(ffn.w_down, tensors.pop(p + "mlp.down_proj.weight"))
            set_weight(layer.attention_norm, tensors.pop(p + "input_layernorm.weight"))
            set_weight(layer.ffn_norm, tensors.pop(p + "post_attention_layernorm.weight"))
        set_weight(self.norm, tensors.pop(prefix + "norm.weight"))


def lm_layout(cfg: LlamaConfig) -> Layout:
    """Released keys of the whole LLM: embeddings, body, and lm_head unless tied (EchoX-3B)."""
    layout = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)} | body_layout(cfg, "model.")
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return layout


class LlamaLM(nn.Module):
    """The LLM: token embeddings, the decoder, and the output head."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embedding_table(cfg.vocab_size, cfg.hidden_size)
        self.body = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                kv_len: int | None = None) -> torch.Tensor:
        return self.body(x, positions, key_valid, kv_len)

    def load_released(self, tensors: dict[str, torch.Tensor]):
        """`tensors` keyed as in `lm_layout(cfg)`; consumed, as `LlamaBody.load_released` does."""
        set_weight(self.embed_tokens, tensors.pop("model.embed_tokens.weight"))
        self.body.load_released(tensors, "model.")
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            set_weight(self.lm_head, tensors.pop("lm_head.weight"))


def load_lm(weights, cfg: LlamaConfig, dtype: torch.dtype, device) -> LlamaLM:
    """The LLM from a checkpoint (anything with `take(layout, what, dtype, device)`), built on the
    meta device so no time goes into a random initialisation that the weights replace."""
    with torch.device("meta"):
        lm = LlamaLM(cfg)
    lm.load_released(weights.take(lm_layout(cfg), "LLM", dtype, device))
    return lm.eval()
