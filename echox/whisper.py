"""Whisper encoder (SPEC §3): two convolutions, stored positions, pre-LN blocks, final LayerNorm."""

from .config import WhisperConfig
from .weights import Layout


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
