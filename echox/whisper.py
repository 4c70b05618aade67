"""Whisper encoder (SPEC §3): two convolutions, stored positions, pre-LN blocks, final LayerNorm.

The encoder sees the whole 30 s window at once (no mask, no cache), so each block is one fused
q/k/v matmul and one SDPA call. The released q/k/v weights are concatenated at load; k_proj
has no bias, so its slice of the fused bias is zero. SDPA's default scale head_dim^-0.5 is the
released scaling of q.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import WhisperConfig
from .errors import EchoXError
from .weights import Checkpoint, Layout


def whisper_layout(cfg: WhisperConfig, prefix: str = "encoder.") -> Layout:
    """Hugging Face WhisperModel encoder keys (a file may add a leading `model.`)."""
    d, f = cfg.d_model, cfg.ffn_dim
    layout: Layout = {
        prefix + "conv1.weight": (d, cfg.num_mel_bins, 3), prefix + "conv1.bias": (d,),
        prefix + "conv2.weight": (d, d, 3), prefix + "conv2.bias": (d,),
        prefix + "embed_positions.weight": (cfg.max_source_positions, d),
    }
    for i in range(cfg.num_layers):
        p = f"{prefix}layers.{i}."
        for name in ("q_proj", "v_proj", "out_proj"):
            layout |= {p + f"self_attn.{name}.weight": (d, d), p + f"self_attn.{name}.bias": (d,)}
        layout[p + "self_attn.k_proj.weight"] = (d, d)  # k_proj has no bias
        layout |= {
            p + "self_attn_layer_norm.weight": (d,), p + "self_attn_layer_norm.bias": (d,),
            p + "fc1.weight": (f, d), p + "fc1.bias": (f,),
            p + "fc2.weight": (d, f), p + "fc2.bias": (d,),
            p + "final_layer_norm.weight": (d,), p + "final_layer_norm.bias": (d,),
        }
    return layout | {prefix + "layer_norm.weight": (d,), prefix + "layer_norm.bias": (d,)}


class EncoderBlock(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.num_heads
        self.attention_norm = nn.LayerNorm(d)
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, d)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, d = x.shape
        q, k, v = self.wqkv(x).view(batch, frames, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, frames, head_dim]
        return self.wo(out.transpose(1, 2).reshape(batch, frames, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(cfg.max_source_positions, d))
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, 2 * max_source_positions] -> hidden states [B, max_source_positions, d_model]."""
        expected = (self.cfg.num_mel_bins, 2 * self.cfg.max_source_positions)
        if tuple(mel.shape[1:]) != expected:
            raise EchoXError(f"Whisper encoder expects log-mel features [batch, {expected[0]}, {expected[1]}] "
                             f"(30 s), got {list(mel.shape)}")
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, 1500, d]
        x = x + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def load_released(self, tensors: dict[str, torch.Tensor]):
        """Take weights named as in `whisper_layout(cfg, prefix="")`, fusing q/k/v."""
        state = {"conv1.weight": tensors["conv1.weight"], "conv1.bias": tensors["conv1.bias"],
                 "conv2.weight": tensors["conv2.weight"], "conv2.bias": tensors["conv2.bias"],
                 "positions": tensors["embed_positions.weight"],
                 "norm.weight": tensors["layer_norm.weight"], "norm.bias": tensors["layer_norm.bias"]}
        for i in range(self.cfg.num_layers):
            p = f"layers.{i}."  # the same block prefix in both namings
            attn = p + "self_attn."
            q_bias = tensors[attn + "q_proj.bias"]
            state |= {
                p + "wqkv.weight": torch.cat([tensors[attn + f"{n}_proj.weight"] for n in "qkv"]),
                p + "wqkv.bias": torch.cat([q_bias, torch.zeros_like(q_bias), tensors[attn + "v_proj.bias"]]),
                p + "wo.weight": tensors[attn + "out_proj.weight"], p + "wo.bias": tensors[attn + "out_proj.bias"],
                p + "attention_norm.weight": tensors[p + "self_attn_layer_norm.weight"],
                p + "attention_norm.bias": tensors[p + "self_attn_layer_norm.bias"],
                p + "ffn_norm.weight": tensors[p + "final_layer_norm.weight"],
                p + "ffn_norm.bias": tensors[p + "final_layer_norm.bias"],
            }
            state |= {p + f"{fc}.{w}": tensors[p + f"{fc}.{w}"] for fc in ("fc1", "fc2") for w in ("weight", "bias")}
        self.load_state_dict(state, strict=True, assign=True)


def encoder_prefix(weights: Checkpoint) -> str:
    """`encoder.` (WhisperModel files) or `model.encoder.` (WhisperForConditionalGeneration files)."""
    for prefix in ("model.encoder.", "encoder."):
        if prefix + "conv1.weight" in weights:
            return prefix
    raise EchoXError(f"{weights.source}: no Whisper encoder weights "
                     f"(expected 'encoder.conv1.weight' or 'model.encoder.conv1.weight')")


def load_whisper(folder: Path | str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> WhisperEncoder:
    """The encoder of a Whisper folder (config.json + safetensors); decoder weights are ignored."""
    folder = Path(folder)
    cfg = WhisperConfig.from_dir(folder)
    weights = Checkpoint(folder)
    prefix = encoder_prefix(weights)
    layout = whisper_layout(cfg, prefix)
    extra = sorted(k for k in weights.keys() if k.startswith(prefix) and k not in layout)
    if extra:
        raise EchoXError(f"{weights.source}: encoder tensors that config.json ({cfg.num_layers} layers) does not "
                         f"describe: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    tensors = weights.take(layout, "Whisper encoder", dtype, device, strip=prefix)
    with torch.device("meta"):  # no random init: every tensor is replaced by a loaded one
        encoder = WhisperEncoder(cfg)
    encoder.load_released(tensors)
    return encoder.eval()
