"""Speech adapter (SPEC §4): Whisper frames -> v speech embeddings at the LLM's width.

Pairs of Whisper frames are concatenated and projected to the LLM width, passed through one
pre-norm encoder layer and a LayerNorm, labelled by a CTC head, shrunk to one frame per run of
equal labels, and refined by a look-back attention among the kept frames. Two quirks of the
released model are reproduced (both are what its weights were trained with):
- the encoder layer ran with batch_first=False on a [1, 750, H] tensor, so its attention saw
  sequences of length 1: each frame attends only to itself, and softmax over one key is 1, so
  attention is out_proj(v_proj(x)); the q and k rows of `in_proj_weight` never matter;
- the shrink keeps the first frame of every run of equal labels, blank runs included.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .errors import EchoXError
from .sampling import GREEDY, head_select
from .weights import Checkpoint, Layout

CTC_ROWS = 64  # frames per CTC-head call: [64, V] fp32 logits at most, 33 MB at the released vocabulary


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
        # The released LookBackModule holds its MultiheadAttention as `encoder_attn` and its own norm.
        prefix + "lbm.encoder_attn.in_proj_weight": (3 * h, h), prefix + "lbm.encoder_attn.in_proj_bias": (3 * h,),
        prefix + "lbm.encoder_attn.out_proj.weight": (h, h), prefix + "lbm.encoder_attn.out_proj.bias": (h,),
        prefix + "lbm.atten_layer_norm.weight": (h,), prefix + "lbm.atten_layer_norm.bias": (h,),
    }


def shrink_keep(labels: torch.Tensor) -> torch.Tensor:
    """[T] per-frame labels -> [v] int64 indices of the frames that start a run of equal labels."""
    starts = torch.ones_like(labels, dtype=torch.bool)
    starts[1:] = labels[1:] != labels[:-1]
    return starts.nonzero().squeeze(1)


class FramewiseEncoderLayer(nn.Module):
    """The released pre-norm TransformerEncoderLayer as it actually ran: attention over length-1
    sequences (each frame attends only to itself), then a ReLU feed-forward."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.value = nn.Linear(h, h)
        self.out = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.linear1 = nn.Linear(h, cfg.ffn_dim)
        self.linear2 = nn.Linear(cfg.ffn_dim, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out(self.value(self.norm1(x)))
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


class LookBackAttention(nn.Module):
    """Multi-head attention of the kept frames among themselves.

    The released module takes the kept frames as queries and all frames as keys and values, with
    a key padding mask that hides every frame not kept; so exactly the kept frames are the keys.
    """

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.wqkv = nn.Linear(h, 3 * h)
        self.wo = nn.Linear(h, h)

    def forward(self, kept_frames: torch.Tensor) -> torch.Tensor:
        """kept_frames [v, H] -> [v, H]."""
        frames, h = kept_frames.shape
        q, k, v = self.wqkv(kept_frames).view(frames, 3, self.heads, h // self.heads).permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v)  # [heads, v, head_dim]
        return self.wo(out.transpose(0, 1).reshape(frames, h))


class SpeechAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.projector = nn.Linear(2 * cfg.encoder_dim, h)
        self.layer = FramewiseEncoderLayer(cfg)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ctc_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.lookback = LookBackAttention(cfg)
        self.lookback_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Whisper frames [T, encoder_dim] (T even, 1500) -> adapter frames [T / 2, H]."""
        count, width = frames.shape
        if width != self.cfg.encoder_dim or count % 2:
            raise EchoXError(f"speech adapter expects an even number of Whisper frames of width "
                             f"{self.cfg.encoder_dim}, got {list(frames.shape)}; is the Whisper folder the "
                             f"one this model was trained with?")
        pairs = frames.to(self.projector.weight.dtype).reshape(count // 2, 2 * width)  # frames 2i, 2i+1 side by side
        return self.out_norm(self.layer(self.projector(pairs)))

    def ctc_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """Whisper frames [1500, encoder_dim] -> CTC logits [750, V] (blank = <audio_patch>)."""
        return self.ctc_head(self.frame_features(frames))

    def ctc_labels(self, features: torch.Tensor) -> torch.Tensor:
        """Adapter frames [T, H] -> the CTC head's argmax per frame [T], without the [T, V] logits
        (385 MB in fp32 at the released vocabulary): through the head-select dispatch (the fused
        kernels' argmax on a GPU), CTC_ROWS frames at a time."""
        step = torch.zeros((), dtype=torch.int64, device=features.device)  # greedy draws no noise
        return torch.cat([head_select(rows, self.ctc_head.weight, GREEDY, step)
                          for rows in features.split(CTC_ROWS)])

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper frames [1500, encoder_dim] -> (speech embeddings [v, H], kept frame indices [v])."""
        features = self.frame_features(frames)  # [750, H]
        kept = shrink_keep(self.ctc_labels(features))
        query = features[kept]  # [v, H]
        return self.lookback_norm(self.lookback(query) + query), kept

    def load_released(self, tensors: dict[str, torch.Tensor]):
        """Take weights named as in `adapter_layout(cfg, prefix="")`."""
        h = self.cfg.hidden_size
        enc, lbm = "asr_transformer_encoder.layers.0.", "lbm.encoder_attn."
        state = {
            "projector.weight": tensors["mm_projector1.weight"], "projector.bias": tensors["mm_projector1.bias"],
            # Only the value rows of the fused in-projection act on a length-1 sequence; the clone
            # lets the unused q/k rows be freed.
            "layer.value.weight": tensors[enc + "self_attn.in_proj_weight"][2 * h:].clone(),
            "layer.value.bias": tensors[enc + "self_attn.in_proj_bias"][2 * h:].clone(),
            "layer.out.weight": tensors[enc + "self_attn.out_proj.weight"],
            "layer.out.bias": tensors[enc + "self_attn.out_proj.bias"],
            "ctc_head.weight": tensors["audio_feature_head.weight"],
            "lookback.wqkv.weight": tensors[lbm + "in_proj_weight"], "lookback.wqkv.bias": tensors[lbm + "in_proj_bias"],
            "lookback.wo.weight": tensors[lbm + "out_proj.weight"], "lookback.wo.bias": tensors[lbm + "out_proj.bias"],
        }
        renamed = {"layer.norm1": enc + "norm1", "layer.norm2": enc + "norm2", "layer.linear1": enc + "linear1",
                   "layer.linear2": enc + "linear2", "out_norm": "out_norm", "lookback_norm": "lbm.atten_layer_norm"}
        state |= {f"{ours}.{w}": tensors[f"{released}.{w}"]
                  for ours, released in renamed.items() for w in ("weight", "bias")}
        self.load_state_dict(state, strict=True, assign=True)


def load_adapter(weights: Checkpoint, cfg: AdapterConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> SpeechAdapter:
    """The adapter of an EchoX checkpoint (keys under `model.`), checked against `cfg`."""
    tensors = weights.take(adapter_layout(cfg), "speech adapter", dtype, device, strip="model.")
    with torch.device("meta"):  # no random init of the [V, H] CTC head: every tensor is replaced
        adapter = SpeechAdapter(cfg)
    adapter.load_released(tensors)
    return adapter.eval()
