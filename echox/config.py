"""Frozen configs for every part of EchoX, parsed from the checkpoints' own files.

Sizes are never guessed: the LLM comes from the EchoX `config.json`, the echo decoder (T2U)
from the `unit_model` rule of SPEC §7 checked against the weights' shapes, Whisper from its
own `config.json`, the vocoder from `vocoder_config.json`. The released sizes are kept as
named presets for benchmarks that run without a checkpoint.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EchoXError

AUDIO_PATCH_TOKEN = "<audio_patch>"


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EchoXError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EchoXError(f"{path}: not valid JSON ({e})") from None


def _field(cfg: dict, name: str, path: Path, default: Any = None, required: bool = True) -> Any:
    if name in cfg:
        return cfg[name]
    if required and default is None:
        raise EchoXError(f"{path}: missing field {name!r}")
    return default


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3") frequency scaling: long wavelengths are slowed down by `factor`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @staticmethod
    def parse(raw: dict | None, path: Path) -> "RopeScaling | None":
        if raw is None:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind == "default":
            return None
        if kind != "llama3":
            raise EchoXError(f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        try:
            return RopeScaling(float(raw["factor"]), float(raw["low_freq_factor"]),
                               float(raw["high_freq_factor"]), int(raw["original_max_position_embeddings"]))
        except KeyError as e:
            raise EchoXError(f"{path}: rope_scaling lacks {e.args[0]!r}") from None


LLAMA3_ROPE = RopeScaling(8.0, 1.0, 4.0, 8192)
LLAMA32_ROPE = RopeScaling(32.0, 1.0, 4.0, 8192)


@dataclass(frozen=True)
class LlamaConfig:
    """One Llama decoder: the LLM, or the body of the echo decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise EchoXError(f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} kv heads")

    @staticmethod
    def from_hf(cfg: dict, path: Path) -> "LlamaConfig":
        hidden = int(_field(cfg, "hidden_size", path))
        heads = int(_field(cfg, "num_attention_heads", path))
        return LlamaConfig(
            hidden_size=hidden,
            num_layers=int(_field(cfg, "num_hidden_layers", path)),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(_field(cfg, "intermediate_size", path)),
            vocab_size=int(_field(cfg, "vocab_size", path)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 500000.0)),
            rope_scaling=RopeScaling.parse(cfg.get("rope_scaling"), path),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class AdapterConfig:
    """Speech adapter (SPEC §4): Whisper frames -> LLM-width speech embeddings."""

    encoder_dim: int  # Whisper d_model (1280 for large-v3)
    hidden_size: int  # LLM width H
    num_heads: int  # LLM heads, used by both attention layers of the adapter
    ffn_dim: int  # 2H
    vocab_size: int  # CTC head rows = LLM vocabulary V
    blank_id: int  # <audio_patch>
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class EchoDecoderConfig:
    """Echo decoder (T2U, SPEC §7): aligner MLP, projection adapter and a small Llama body."""

    llm_hidden_size: int  # H, width of the text embeddings and of the LLM hidden states
    aligner_intermediate: int  # I, from the weights
    text_vocab_size: int  # V
    unit_vocab_size: int  # U
    body: LlamaConfig  # width h, vocab V + U
    max_new_tokens: int = 2048


@dataclass(frozen=True)
class WhisperConfig:
    num_mel_bins: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_source_positions: int = 1500

    @staticmethod
    def from_dir(folder: Path) -> "WhisperConfig":
        path = folder / "config.json"
        cfg = read_json(path)
        return WhisperConfig(
            num_mel_bins=int(_field(cfg, "num_mel_bins", path)),
            d_model=int(_field(cfg, "d_model", path)),
            num_layers=int(_field(cfg, "encoder_layers", path)),
            num_heads=int(_field(cfg, "encoder_attention_heads", path)),
            ffn_dim=int(_field(cfg, "encoder_ffn_dim", path)),
            max_source_positions=int(cfg.get("max_source_positions", 1500)),
        )


WHISPER_LARGE_V3 = WhisperConfig(num_mel_bins=128, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120)


@dataclass(frozen=True)
class VocoderConfig:
    """fairseq CodeHiFiGAN with a duration predictor (SPEC §8)."""

    upsample_rates: tuple[int, ...] = (5, 4, 4, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 8, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    num_embeddings: int = 1000
    embedding_dim: int = 128
    duration_hidden: int = 128
    duration_kernel_size: int = 3
    num_speakers: int = 0  # >0 when `multispkr`: a speaker embedding is concatenated
    speaker_embedding_dim: int = 0
    sample_rate: int = 16000

    @property
    def hop_length(self) -> int:
        hop = 1
        for rate in self.upsample_rates:
            hop *= rate
        return hop

    @staticmethod
    def from_dir(folder: Path) -> "VocoderConfig":
        path = folder / "vocoder_config.json"
        cfg = read_json(path)
        if str(cfg.get("resblock", "1")) != "1":
            raise EchoXError(f"{path}: resblock {cfg['resblock']!r} is not supported (only '1')")
        dur = cfg.get("dur_predictor_params") or {}
        multispkr = bool(cfg.get("multispkr"))
        return VocoderConfig(
            upsample_rates=tuple(_field(cfg, "upsample_rates", path)),
            upsample_kernel_sizes=tuple(_field(cfg, "upsample_kernel_sizes", path)),
            upsample_initial_channel=int(_field(cfg, "upsample_initial_channel", path)),
            resblock_kernel_sizes=tuple(_field(cfg, "resblock_kernel_sizes", path)),
            resblock_dilation_sizes=tuple(tuple(d) for d in _field(cfg, "resblock_dilation_sizes", path)),
            num_embeddings=int(cfg.get("num_embeddings", 1000)),
            embedding_dim=int(cfg.get("embedding_dim", 128)),
            duration_hidden=int(dur.get("var_pred_hidden_dim", 128)),
            duration_kernel_size=int(dur.get("var_pred_kernel_size", 3)),
            # fairseq's CodeHiFiGAN defaults: 200 speakers, embedded at the unit-embedding width.
            num_speakers=int(cfg.get("num_speakers", 200)) if multispkr else 0,
            speaker_embedding_dim=int(cfg.get("speaker_embedding_dim", cfg.get("embedding_dim", 128))) if multispkr else 0,
        )

    def to_json(self) -> dict:
        raw = dataclasses.asdict(self)
        return {
            "resblock": "1",
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "upsample_initial_channel": self.upsample_initial_channel,
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "num_embeddings": raw["num_embeddings"],
            "embedding_dim": raw["embedding_dim"],
            "model_in_dim": raw["embedding_dim"],
            "dur_predictor_params": {"encoder_embed_dim": self.embedding_dim,
                                     "var_pred_hidden_dim": self.duration_hidden,
                                     "var_pred_kernel_size": self.duration_kernel_size,
                                     "var_pred_dropout": 0.5},
            "multispkr": self.num_speakers > 0,
            "num_speakers": self.num_speakers,
            "speaker_embedding_dim": self.speaker_embedding_dim,
        }


def echo_body_for(unit_model: str | None, llm: LlamaConfig, vocab_size: int) -> LlamaConfig:
    """The T2U body size selected by config.json `unit_model` (SPEC §7)."""
    if unit_model == "large":
        width, layers, heads, kv, ffn = llm.hidden_size, 2, llm.num_heads, llm.num_kv_heads, llm.intermediate_size
    elif unit_model == "small":
        width, layers, heads, kv, ffn = 512, 4, 8, llm.num_kv_heads, 2048
    elif unit_model is None:
        width, layers, heads, kv, ffn = 512, 6, 8, llm.num_kv_heads, 2048
    else:
        width, layers, heads, kv, ffn = 768, 8, 12, 12, 2048
    return LlamaConfig(
        hidden_size=width, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=width // heads,
        intermediate_size=ffn, vocab_size=vocab_size, max_position_embeddings=2048,
        rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, rope_scaling=llm.rope_scaling,
    )


@dataclass(frozen=True)
class EchoXConfig:
    """Everything inside an EchoX model folder (Whisper and the vocoder are separate folders)."""

    llm: LlamaConfig
    adapter: AdapterConfig
    echo: EchoDecoderConfig
    unit_model: str | None
    audio_tower: str | None  # path or hub id of the Whisper encoder, from config.json
    torch_dtype: str | None

    @staticmethod
    def parse(cfg: dict, path: Path, blank_id: int, aligner_intermediate: int,
              whisper_dim: int = WHISPER_LARGE_V3.d_model) -> "EchoXConfig":
        llm = LlamaConfig.from_hf(cfg, path)
        units = int(_field(cfg, "unit_vocab_size", path))
        unit_model = cfg.get("unit_model")
        return EchoXConfig(
            llm=llm,
            adapter=AdapterConfig(encoder_dim=whisper_dim, hidden_size=llm.hidden_size, num_heads=llm.num_heads,
                                  ffn_dim=2 * llm.hidden_size, vocab_size=llm.vocab_size, blank_id=blank_id),
            echo=EchoDecoderConfig(llm_hidden_size=llm.hidden_size, aligner_intermediate=aligner_intermediate,
                                   text_vocab_size=llm.vocab_size, unit_vocab_size=units,
                                   body=echo_body_for(unit_model, llm, llm.vocab_size + units)),
            unit_model=unit_model,
            audio_tower=cfg.get("audio_tower"),
            torch_dtype=cfg.get("torch_dtype"),
        )


# Released LLM sizes (SPEC §1), for benchmarks with random weights.
ECHOX_8B_LLM = LlamaConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                           intermediate_size=14336, vocab_size=128257, max_position_embeddings=131072,
                           rope_scaling=LLAMA3_ROPE)
ECHOX_3B_LLM = LlamaConfig(hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                           intermediate_size=8192, vocab_size=128257, max_position_embeddings=131072,
                           rope_scaling=LLAMA32_ROPE, tie_word_embeddings=True)
