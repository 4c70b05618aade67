"""Unit HiFi-GAN vocoder with duration predictor (fairseq CodeHiFiGAN, SPEC §8)."""

from .config import VocoderConfig
from .weights import Layout


def _weight_norm_conv(name: str, out_ch: int, in_ch: int, kernel: int, transposed: bool = False) -> Layout:
    """A weight-normed conv as fairseq stores it: g has the size of dim 0, v the full weight."""
    full = (in_ch, out_ch, kernel) if transposed else (out_ch, in_ch, kernel)
    return {name + ".weight_g": (full[0], 1, 1), name + ".weight_v": full, name + ".bias": (out_ch,)}


def fairseq_layout(cfg: VocoderConfig) -> Layout:
    """Keys and shapes of `g_*["generator"]`, with weight-norm pairs (weight_g, weight_v)."""
    emb, hid, k = cfg.embedding_dim, cfg.duration_hidden, cfg.duration_kernel_size
    layout: Layout = {"dict.weight": (cfg.num_embeddings, emb)}
    if cfg.num_speakers:
        layout["spkr.weight"] = (cfg.num_speakers, cfg.speaker_embedding_dim)
    layout |= _weight_norm_conv("conv_pre", cfg.upsample_initial_channel, emb + cfg.speaker_embedding_dim, 7)
    channels = cfg.upsample_initial_channel
    for stage, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        layout |= _weight_norm_conv(f"ups.{stage}", channels // 2, channels, kernel, transposed=True)
        channels //= 2
        for j, res_kernel in enumerate(cfg.resblock_kernel_sizes):
            block = f"resblocks.{stage * len(cfg.resblock_kernel_sizes) + j}"
            for conv in ("convs1", "convs2"):
                for m in range(len(cfg.resblock_dilation_sizes[j])):
                    layout |= _weight_norm_conv(f"{block}.{conv}.{m}", channels, channels, res_kernel)
    layout |= _weight_norm_conv("conv_post", 1, channels, 7)
    return layout | {
        "dur_predictor.conv1.0.weight": (hid, emb, k), "dur_predictor.conv1.0.bias": (hid,),
        "dur_predictor.ln1.weight": (hid,), "dur_predictor.ln1.bias": (hid,),
        "dur_predictor.conv2.0.weight": (hid, hid, k), "dur_predictor.conv2.0.bias": (hid,),
        "dur_predictor.ln2.weight": (hid,), "dur_predictor.ln2.bias": (hid,),
        "dur_predictor.proj.weight": (1, hid), "dur_predictor.proj.bias": (1,),
    }
