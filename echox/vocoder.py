"""Unit HiFi-GAN vocoder with duration predictor (fairseq CodeHiFiGAN, SPEC §8).

HuBERT units (0..999) are embedded; a small conv net predicts how many 20 ms frames each unit
lasts; the units repeated that many times go through a HiFi-GAN generator: a conv, five
transposed-conv upsampling stages each followed by the mean of three multi-dilation residual
blocks, a last conv and tanh, giving `hop_length` samples of 16 kHz audio per frame.

fairseq stores each generator conv with weight norm (weight_g, weight_v). The pair is folded
into one weight at load, so inference runs plain convolutions; `convert_fairseq_vocoder`
writes the folded weights as safetensors, which later load without unpickling anything.
This file is the offline reference; echox/streaming_vocoder.py streams it exactly.
"""

import argparse
import numbers
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import VocoderConfig
from .errors import EchoXError
from .outputs import atomic_file, check_output_file, check_output_folder
from .weights import Checkpoint, Layout, embedding_table, save_safetensors

STAGE_SLOPE = 0.1  # leaky relu slope inside the generator (fairseq LRELU_SLOPE)
FINAL_SLOPE = 0.01  # quirk: the leaky relu before conv_post uses torch's default slope
PRE_POST_KERNEL = 7  # conv_pre and conv_post
# A unit's frame count rounds exp(log d) - 1, so a last-bit difference in log d adds or drops a whole
# frame where it sits near a rounding edge. A streamed conv over a cache and the offline one over
# the whole sequence sum in different orders (TF32 on a GPU far more coarsely): in fp32 they
# disagreed for about one unit in 1e5. The predictor is small, so it runs in float64, where they
# agree to ~1e-15 (its weights are the checkpoint's fp32 values, exactly).
DURATION_DTYPE = torch.float64


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
    channels = cfg.upsample_initial_channel
    layout |= _weight_norm_conv("conv_pre", channels, emb + cfg.speaker_embedding_dim, PRE_POST_KERNEL)
    for stage, kernel in enumerate(cfg.upsample_kernel_sizes):
        layout |= _weight_norm_conv(f"ups.{stage}", channels // 2, channels, kernel, transposed=True)
        channels //= 2
        for j, res_kernel in enumerate(cfg.resblock_kernel_sizes):
            block = f"resblocks.{stage * len(cfg.resblock_kernel_sizes) + j}"
            for conv in ("convs1", "convs2"):
                for m in range(len(cfg.resblock_dilation_sizes[j])):
                    layout |= _weight_norm_conv(f"{block}.{conv}.{m}", channels, channels, res_kernel)
    layout |= _weight_norm_conv("conv_post", 1, channels, PRE_POST_KERNEL)
    return layout | {
        "dur_predictor.conv1.0.weight": (hid, emb, k), "dur_predictor.conv1.0.bias": (hid,),
        "dur_predictor.ln1.weight": (hid,), "dur_predictor.ln1.bias": (hid,),
        "dur_predictor.conv2.0.weight": (hid, hid, k), "dur_predictor.conv2.0.bias": (hid,),
        "dur_predictor.ln2.weight": (hid,), "dur_predictor.ln2.bias": (hid,),
        "dur_predictor.proj.weight": (1, hid), "dur_predictor.proj.bias": (1,),
    }


def folded_layout(cfg: VocoderConfig) -> Layout:
    """Keys and shapes of the folded weights (the Vocoder's state_dict): each pair becomes `.weight`."""
    return {key.removesuffix("_v"): shape for key, shape in fairseq_layout(cfg).items()
            if not key.endswith(".weight_g")}


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W = g * v / ||v||, the norm over every dim but 0 (for ConvTranspose1d, dim 0 is the input channel).

    Computed in fp32 whatever the stored dtype, in the order torch's own weight norm uses.
    """
    v = v.float()
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    return v * (g.float() / norm)


def fold_fairseq_weights(generator: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fairseq's `generator` state -> the folded fp32 weights of `folded_layout`."""
    folded = {}
    for key, tensor in generator.items():
        if key.endswith(".weight_v"):
            name = key.removesuffix("_v")
            folded[name] = fold_weight_norm(generator[name + "_g"], tensor)
        elif not key.endswith(".weight_g"):
            folded[key] = tensor.float()
    return folded


def check_tensors(tensors: dict[str, torch.Tensor], layout: Layout, source: Path):
    """Every key of `layout` present as a floating point tensor of its shape, and nothing else (an
    integer or bool tensor would be cast to float without a word)."""
    for key, shape in layout.items():
        if key not in tensors:
            raise EchoXError(f"{source}: missing tensor {key!r}")
        if not isinstance(tensors[key], torch.Tensor):
            raise EchoXError(f"{source}: {key!r} is of type {type(tensors[key]).__name__}, but weights are tensors")
        if not tensors[key].dtype.is_floating_point:
            raise EchoXError(f"{source}: {key!r} is stored as {str(tensors[key].dtype).removeprefix('torch.')}, "
                             "but weights are floating point")
        if tuple(tensors[key].shape) != tuple(shape):
            raise EchoXError(f"{source}: {key!r} has shape {list(tensors[key].shape)}, "
                             f"but vocoder_config.json implies {list(shape)}")
    extra = sorted(set(tensors) - set(layout))
    if extra:
        raise EchoXError(f"{source}: tensors that vocoder_config.json does not describe: {', '.join(extra[:5])}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))


def check_architecture(cfg: VocoderConfig):
    """Shapes for which "same" padding and exact `hop_length` upsampling hold, as the model needs."""
    if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        raise EchoXError("vocoder_config.json: upsample_rates and upsample_kernel_sizes need the same length")
    for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        if kernel < rate or (kernel - rate) % 2:
            raise EchoXError(f"vocoder_config.json: upsample kernel {kernel} with rate {rate}: expected "
                             "kernel >= rate with an even difference")
    if len(cfg.resblock_dilation_sizes) != len(cfg.resblock_kernel_sizes):
        raise EchoXError("vocoder_config.json: resblock_dilation_sizes needs one list per resblock kernel size")
    for kernel in (*cfg.resblock_kernel_sizes, cfg.duration_kernel_size):
        if kernel % 2 == 0:
            raise EchoXError(f"vocoder_config.json: kernel size {kernel} must be odd for 'same' padding")


def durations_from_log(log_durations: torch.Tensor) -> torch.Tensor:
    """d = clamp(round(exp(logd) - 1), min 1): frames per unit, int64 (round half to even, as torch)."""
    return torch.clamp(torch.round(torch.exp(log_durations) - 1).long(), min=1)


class DurationPredictor(nn.Module):
    """Log duration per unit from the unit embeddings (fairseq VariancePredictor, no dropout)."""

    def __init__(self, embedding_dim: int, hidden: int, kernel: int):
        super().__init__()
        pad = (kernel - 1) // 2
        # fairseq wraps each conv with its ReLU in a Sequential (keys conv1.0.*); here the ReLU
        # lives in after_conv1/after_conv2, which the streaming path shares.
        self.conv1 = nn.Sequential(nn.Conv1d(embedding_dim, hidden, kernel, padding=pad))
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=pad))
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def after_conv1(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU, then LayerNorm over channels: [B, hidden, T] -> [B, hidden, T]."""
        return self.ln1(torch.relu(h).transpose(1, 2)).transpose(1, 2)

    def after_conv2(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU, LayerNorm over channels, Linear: [B, hidden, T] -> log durations [B, T]."""
        return self.proj(self.ln2(torch.relu(h).transpose(1, 2))).squeeze(-1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, E, T] -> log durations [B, T]."""
        return self.after_conv2(self.conv2(self.after_conv1(self.conv1(embeddings))))


class ResBlock1(nn.Module):
    """HiFi-GAN ResBlock1: per dilation d, x += conv2(lrelu(conv1_d(lrelu(x)))), "same" padding."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = conv2(F.leaky_relu(conv1(F.leaky_relu(x, STAGE_SLOPE)), STAGE_SLOPE)) + x
        return x


class Vocoder(nn.Module):
    """The CodeHiFiGAN vocoder; module names are fairseq's, so state_dict keys = `folded_layout`."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        check_architecture(cfg)
        self.cfg = cfg
        self.dict = embedding_table(cfg.num_embeddings, cfg.embedding_dim)
        if cfg.num_speakers:
            self.spkr = embedding_table(cfg.num_speakers, cfg.speaker_embedding_dim)
        self.dur_predictor = DurationPredictor(cfg.embedding_dim, cfg.duration_hidden,
                                               cfg.duration_kernel_size).to(DURATION_DTYPE)
        channels = cfg.upsample_initial_channel
        pad = (PRE_POST_KERNEL - 1) // 2
        self.conv_pre = nn.Conv1d(cfg.embedding_dim + cfg.speaker_embedding_dim, channels, PRE_POST_KERNEL,
                                  padding=pad)
        self.ups, self.resblocks = nn.ModuleList(), nn.ModuleList()
        for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, stride=rate,
                                               padding=(kernel - rate) // 2))
            channels //= 2
            for res_kernel, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(channels, res_kernel, dilations))
        self.conv_post = nn.Conv1d(channels, 1, PRE_POST_KERNEL, padding=pad)

    @classmethod
    def from_weights(cls, cfg: VocoderConfig, folded: dict[str, torch.Tensor], source: Path | str = "weights",
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "Vocoder":
        """A vocoder holding `folded` (keys and shapes of `folded_layout(cfg)`, checked)."""
        check_tensors(folded, folded_layout(cfg), Path(source))
        # Built on the meta device: every value is replaced by a loaded one, so no random init.
        with torch.device("meta"):
            vocoder = cls(cfg)
        vocoder.load_state_dict(folded, assign=True)
        vocoder.to(device=device, dtype=dtype)
        vocoder.dur_predictor.to(DURATION_DTYPE)  # whatever the generator's dtype
        return vocoder.requires_grad_(False).eval()

    @property
    def blocks_per_stage(self) -> int:
        return len(self.cfg.resblock_kernel_sizes)

    def stage_blocks(self, stage: int) -> nn.ModuleList:
        k = self.blocks_per_stage
        return self.resblocks[stage * k:(stage + 1) * k]

    def check_units(self, units: torch.Tensor) -> torch.Tensor:
        """Unit ids as int64 [T] on the vocoder's device; a clear error for anything else."""
        if not isinstance(units, torch.Tensor):  # a list of ids, say: floats and bools are refused below, not cut
            try:
                units = torch.as_tensor(units) if len(units) else torch.zeros(0, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise EchoXError(f"vocoder units: expected integer unit ids, got {type(units).__name__} "
                                 f"({e})") from None
        if units.dim() != 1 or units.dtype.is_floating_point or units.dtype.is_complex or units.dtype == torch.bool:
            raise EchoXError(f"vocoder units: expected a 1-D tensor of integer unit ids, got {units.dtype} "
                             f"of shape {list(units.shape)}")
        bad = (units < 0) | (units >= self.cfg.num_embeddings)
        if bad.any():
            position = int(bad.nonzero()[0, 0])
            raise EchoXError(f"vocoder units: id {int(units[position])} at position {position} is out of range "
                             f"0..{self.cfg.num_embeddings - 1} (num_embeddings in vocoder_config.json)")
        return units.to(device=self.dict.weight.device, dtype=torch.int64)

    def speaker_embedding(self, speaker: int | None) -> torch.Tensor | None:
        """[speaker_embedding_dim] for a multi-speaker vocoder; None for a single-speaker one."""
        count = self.cfg.num_speakers
        if count == 0:
            if speaker is not None:
                raise EchoXError(f"speaker {speaker}: this vocoder has one voice (multispkr is off in "
                                 "vocoder_config.json); pass no speaker id")
            return None
        if not isinstance(speaker, numbers.Integral) or isinstance(speaker, bool) or not 0 <= speaker < count:
            raise EchoXError(f"speaker {speaker}: this multi-speaker vocoder needs a speaker id 0..{count - 1} "
                             "(num_speakers in vocoder_config.json)")
        return self.spkr.weight[int(speaker)]

    def frame_features(self, frame_units: torch.Tensor, speaker: torch.Tensor | None) -> torch.Tensor:
        """Checked unit ids [N] (+ speaker embedding) -> conv_pre input [1, E (+ S), N]."""
        x = self.dict(frame_units).T[None]
        if speaker is None:
            return x
        return torch.cat([x, speaker[None, :, None].expand(1, -1, x.shape[-1])], dim=1)

    def durations(self, units: torch.Tensor) -> torch.Tensor:
        """Frames per unit, [T] int64 (>= 1 each)."""
        units = self.check_units(units)
        if units.numel() == 0:
            return units
        return durations_from_log(self.dur_predictor(self.dict(units).T[None].to(DURATION_DTYPE))[0])

    def generate(self, frame_units: torch.Tensor, speaker: int | None = None) -> torch.Tensor:
        """The generator alone on already-repeated units [N] -> wave [N * hop_length]."""
        frame_units = self.check_units(frame_units)
        speaker_vec = self.speaker_embedding(speaker)
        if frame_units.numel() == 0:
            return self.conv_post.weight.new_zeros(0)
        x = self.conv_pre(self.frame_features(frame_units, speaker_vec))  # [1, C, N]
        for stage, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, STAGE_SLOPE))  # [1, C / 2^(s+1), N * rate_0 * ... * rate_s]
            blocks = self.stage_blocks(stage)
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / len(blocks)
        return torch.tanh(self.conv_post(F.leaky_relu(x, FINAL_SLOPE)))[0, 0]

    def forward(self, units: torch.Tensor, speaker: int | None = None) -> torch.Tensor:
        """Units [T] -> wave [sum(durations) * hop_length]: the offline reference."""
        units = self.check_units(units)
        return self.generate(torch.repeat_interleave(units, self.durations(units)), speaker)


def unpickling_reason(error: Exception) -> str:
    """The line of torch's message that says what is wrong, never its advice to load with
    weights_only=False (which would run whatever code a damaged or hostile file holds)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    refused = next((line for line in lines if "Unsupported global" in line or "GLOBAL" in line), None)
    if refused is not None:
        return refused.split(". Please")[0][:200]
    plain = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line]
    return plain[0][:200] if plain else "unreadable"


def _refuse_compressed_entries(path: Path):
    """torch.save stores its zip entries uncompressed; a compressed one could inflate a small file into
    any amount of memory inside torch.load, before a single shape is checked."""
    if not zipfile.is_zipfile(path):
        return  # a legacy (pre-zip) torch pickle, or no checkpoint at all: torch.load names it
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise EchoXError(f"{path}: not a readable fairseq vocoder checkpoint ({e})") from None
    if packed:
        raise EchoXError(f"{path}: not a checkpoint torch.save wrote: {packed[0]} is compressed "
                         "(torch.save stores every entry uncompressed)")


def _read_fairseq(path: Path, cfg: VocoderConfig) -> dict[str, torch.Tensor]:
    """The checked `generator` state of a fairseq `g_*` pickle, read without running pickled code."""
    _refuse_compressed_entries(path)
    try:
        # fairseq keeps its command line as an argparse.Namespace beside the weights: plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean an unreadable file
        raise EchoXError(f"{path}: not a readable fairseq vocoder checkpoint ({type(e).__name__}: "
                         f"{unpickling_reason(e)})") from None
    generator = state.get("generator") if isinstance(state, dict) else None
    if not isinstance(generator, dict):
        raise EchoXError(f"{path}: expected a fairseq checkpoint with a 'generator' state dict")
    check_tensors(generator, fairseq_layout(cfg), path)
    return generator


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    weights = Checkpoint(path)
    return {key: weights.get(key) for key in weights.keys()}


def _holds_vocoder(path: Path) -> bool:
    return "conv_post.weight" in Checkpoint(path)


def latest_fairseq_checkpoint(folder: Path) -> Path | None:
    pickles = sorted(p for p in folder.glob("g_*") if p.is_file())
    return pickles[-1] if pickles else None  # fairseq names them g_<zero-padded step>: the last is the newest


def find_vocoder_weights(folder: Path) -> Path:
    """The folded safetensors in `folder` if there is one, else the latest fairseq `g_*` pickle."""
    converted = [p for p in sorted(folder.glob("*.safetensors")) if _holds_vocoder(p)]
    if len(converted) > 1:
        raise EchoXError(f"{folder}: several vocoder safetensors ({', '.join(p.name for p in converted)}); keep one")
    if converted:
        return converted[0]
    pickle = latest_fairseq_checkpoint(folder)
    if pickle is None:
        raise EchoXError(f"{folder}: no vocoder weights (expected a fairseq g_* file or a converted "
                         "*.safetensors holding conv_post.weight)")
    return pickle


def load_vocoder(folder: Path | str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Vocoder:
    """The vocoder of a folder holding vocoder_config.json and its weights (see find_vocoder_weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EchoXError(f"{folder}: vocoder folder not found")
    cfg = VocoderConfig.from_dir(folder)
    path = find_vocoder_weights(folder)
    if path.suffix == ".safetensors":
        folded = _read_safetensors(path)
    else:
        folded = fold_fairseq_weights(_read_fairseq(path, cfg))
    return Vocoder.from_weights(cfg, folded, path, dtype, device)


def convert_fairseq_vocoder(src_folder: Path | str, out_file: Path | str, overwrite: bool = False) -> Path:
    """Write the folded fp32 weights of `src_folder`'s `g_*` as safetensors at `out_file`.

    A folder holding that file and the same vocoder_config.json loads to identical weights. The
    output is checked writable before any work and written atomically (see outputs.py).
    """
    src_folder, out_file = Path(src_folder), Path(out_file)
    check_output_folder(out_file.parent, "the converted vocoder")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    check_output_file(out_file, overwrite, "the converted vocoder")
    if not src_folder.is_dir():
        raise EchoXError(f"{src_folder}: vocoder folder not found")
    cfg = VocoderConfig.from_dir(src_folder)
    pickle = latest_fairseq_checkpoint(src_folder)
    if pickle is None:
        raise EchoXError(f"{src_folder}: no fairseq g_* vocoder checkpoint to convert")
    folded = fold_fairseq_weights(_read_fairseq(pickle, cfg))
    with atomic_file(out_file) as temporary:
        save_safetensors({k: v.contiguous() for k, v in folded.items()}, temporary)
    return out_file
