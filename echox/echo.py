"""Echo decoder (T2U, SPEC §7): LLM hidden states of one segment -> unit-language tokens."""

from .config import EchoDecoderConfig
from .llama import body_layout
from .weights import Layout


def echo_layout(cfg: EchoDecoderConfig, prefix: str = "unit_translator.") -> Layout:
    big_h, inner, width = cfg.llm_hidden_size, cfg.aligner_intermediate, cfg.body.hidden_size
    return {
        prefix + "aligner_MLP.0.weight": (inner, big_h), prefix + "aligner_MLP.0.bias": (inner,),
        prefix + "aligner_MLP.3.weight": (big_h, inner), prefix + "aligner_MLP.3.bias": (big_h,),
        prefix + "model.embed_tokens.weight": (cfg.text_vocab_size, big_h),
        prefix + "unit_embedding.weight": (cfg.unit_vocab_size, big_h),
        prefix + "adapter.weight": (width, big_h), prefix + "adapter.bias": (width,),
        prefix + "lm_head.weight": (cfg.body.vocab_size, width),
    } | body_layout(cfg.body, prefix + "model.")
