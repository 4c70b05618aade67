"""Speech adapter (SPEC §4): Whisper frames -> v speech embeddings at the LLM's width."""

from .config import AdapterConfig
from .weights import Layout


def adapter_layout(cfg: AdapterConfig, prefix: str = "model.") -> Layout:
    h, e = cfg.hidden_size, cfg.encoder_dim
    layer = prefix + "asr_transformer_encoder.layers.0."
    return {
        prefix + "mm_projector1.weight": (h, 2 * e), prefix + "mm_projector1.bias": (h,),
        layer + "self_attn.in_proj_weight": (3 * h, h), layer + "self_attn.in_proj_bias": (3 * h,),
        layer + "self_attn.out_proj.weight": (h, h), layer + "self_attn.out_proj.bias": (h,),
        layer + "linear1.weight": (cfg.ffn_dim, h), layer + "linear1.bias": (cfg.ffn_dim,),
        layer + "linear2.weight": (h, cfg.ffn_dim), layer + "linear2.bias": (h,),
        layer + "norm1.weight": (h,), layer + "norm1.bias": (h,),
        layer + "norm2.weight": (h,), layer + "norm2.bias": (h,),
        prefix + "out_norm.weight": (h,), prefix + "out_norm.bias": (h,),
        prefix + "audio_feature_head.weight": (cfg.vocab_size, h),
        prefix + "lbm.in_proj_weight": (3 * h, h), prefix + "lbm.in_proj_bias": (3 * h,),
        prefix + "lbm.out_proj.weight": (h, h), prefix + "lbm.out_proj.bias": (h,),
        prefix + "atten_layer_norm.weight": (h,), prefix + "atten_layer_norm.bias": (h,),
    }
