"""Frozen configs for every part of EchoX, parsed from the checkpoints' own files.

Sizes are never guessed: the LLM comes from the EchoX `config.json`, the echo decoder (T2U)
from the `unit_model` rule of SPEC §7 checked against the weights' shapes, Whisper from its
own `config.json`, the vocoder from `vocoder_config.json`. The released sizes are kept as
named presets for benchmarks that run without a checkpoint.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EchoXError

AUDIO_PATCH_TOKEN = "<audio_patch>"


def require_folder(path: Path, what: str):
    """`path` is a folder; a file there, or nothing, is named as such."""
    if not path.is_dir():
        raise EchoXError(f"{path}: is a file, not a {what}" if path.exists() else f"{path}: {what} not found")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; a missing, unreadable or malformed file is one named error."""
    if path.is_dir():
        raise EchoXError(f"{path}: is a folder, not a JSON file")
    if not path.is_file():
        raise EchoXError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise EchoXError(f"{path}: cannot be read ({e.strerror or e})") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise EchoXError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # malformed, not UTF-8, or an integer of more than 4300 digits
        reason = str(e).split("; use sys.set_int_max_str_digits")[0]  # advice for programmers, not users
        raise EchoXError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(raw, dict):
        raise EchoXError(f"{path}: expected a JSON object {{...}}, got {type(raw).__name__}")
    return raw


REQUIRED = object()  # the default of a field that must be present
MAX_SIZE = 2**53  # beyond it float math on a size (RoPE's wavelengths) is inexact, then overflows
KIND_NAMES = {int: "a positive integer (at most 2**53)", float: "a positive number", bool: "true or false",
              str: "a string", dict: "an object {...}", list: "a list"}


def _checked(value: Any, kind: type, where: str) -> Any:
    """`value` as `kind`. JSON has one number type, so a whole float passes as an int; bools are not
    numbers; every number echox reads from a config is a size or a scale, so it must be positive."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and (isinstance(value, int) or value.is_integer()) and 0 < value <= MAX_SIZE:
        return int(value)
    if kind is float and number and math.isfinite(value) and value > 0:
        return float(value)
    if kind not in (int, float) and isinstance(value, kind):
        return value
    raise EchoXError(f"{where} is {json.dumps(value)}, expected {KIND_NAMES[kind]}")


def _field(cfg: dict, name: str, path: Path | str, kind: type = int, default: Any = REQUIRED) -> Any:
    """cfg[name] checked as `kind`; an absent or null optional field gives `default`. `path` names
    the file (and the enclosing object, for nested fields) in errors."""
    value = cfg.get(name)
    if value is None:
        if default is REQUIRED:
            raise EchoXError(f"{path}: missing field {name!r}" if name not in cfg
                             else f"{path}: field {name!r} is null, expected {KIND_NAMES[kind]}")
        return default
    return _checked(value, kind, f"{path}: field {name!r}")


def _split_into_heads(path: Path, cfg: dict, width: str, heads: str, user: str):
    """Attention that cuts the width `cfg[width]` into `cfg[heads]` equal heads: checked with the
    file's fields named, before any weight is read (the view fails mid-turn otherwise)."""
    if _field(cfg, width, path) % _field(cfg, heads, path):
        raise EchoXError(f"{path}: {width} {cfg[width]} is not a multiple of {heads} {cfg[heads]} "
                         f"({user} splits the width into that many heads)")


def _ints(cfg: dict, name: str, path: Path) -> tuple[int, ...]:
    """A required list of positive integers."""
    return tuple(_checked(v, int, f"{path}: an entry of {name!r}") for v in _field(cfg, name, path, list))


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3") frequency scaling: long wavelengths are slowed down by `factor`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @staticmethod
    def parse(cfg: dict, path: Path) -> "RopeScaling | None":
        raw = _field(cfg, "rope_scaling", path, dict, None)
        if raw is None:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind == "default":
            return None
        if kind != "llama3":
            raise EchoXError(f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        where = f"{path}: rope_scaling"
        return RopeScaling(_field(raw, "factor", where, float), _field(raw, "low_freq_factor", where, float),
                           _field(raw, "high_freq_factor", where, float),
                           _field(raw, "original_max_position_embeddings", where, int))


LLAMA3_ROPE = RopeScaling(8.0, 1.0, 4.0, 8192)
LLAMA32_ROPE = RopeScaling(32.0, 1.0, 4.0, 8192)


def _check_llama_body(cfg: dict, path: Path):
    """Fields that would make another model than EchoX's Llama, which runs SiLU and no biases: such
    a checkpoint is refused, where it ran with the wrong activation and its biases unread."""
    if (act := _field(cfg, "hidden_act", path, str, "silu")) != "silu":
        raise EchoXError(f"{path}: hidden_act {act!r} is not supported (EchoX's Llama uses 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if _field(cfg, name, path, bool, False):
            raise EchoXError(f"{path}: {name} true is not supported (EchoX's Llama has no biases)")


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
        hidden = _field(cfg, "hidden_size", path)
        heads = _field(cfg, "num_attention_heads", path)
        kv_heads = _field(cfg, "num_key_value_heads", path, int, heads)
        if heads % kv_heads:  # checked here too, where the file and its fields can be named
            raise EchoXError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        _check_llama_body(cfg, path)
        return LlamaConfig(
            hidden_size=hidden,
            num_layers=_field(cfg, "num_hidden_layers", path),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=_field(cfg, "head_dim", path, int, hidden // heads),
            intermediate_size=_field(cfg, "intermediate_size", path),
            vocab_size=_field(cfg, "vocab_size", path),
            max_position_embeddings=_field(cfg, "max_position_embeddings", path, int, 131072),
            rms_norm_eps=_field(cfg, "rms_norm_eps", path, float, 1e-5),
            rope_theta=_field(cfg, "rope_theta", path, float, 500000.0),
            rope_scaling=RopeScaling.parse(cfg, path),
            tie_word_embeddings=_field(cfg, "tie_word_embeddings", path, bool, False),
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
        _split_into_heads(path, cfg, "d_model", "encoder_attention_heads", "the Whisper encoder")
        return WhisperConfig(
            num_mel_bins=_field(cfg, "num_mel_bins", path),
            d_model=_field(cfg, "d_model", path),
            num_layers=_field(cfg, "encoder_layers", path),
            num_heads=_field(cfg, "encoder_attention_heads", path),
            ffn_dim=_field(cfg, "encoder_ffn_dim", path),
            max_source_positions=_field(cfg, "max_source_positions", path, int, 1500),
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

    def __post_init__(self):
        # The engine's audio is 16 kHz throughout (SPEC §8): a vocoder made for another rate would be
        # written out at the wrong speed and pitch.
        if self.sample_rate != 16000:
            raise EchoXError(f"a vocoder's sampling rate of {self.sample_rate} Hz is not supported (only 16000)")

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
        dur = _field(cfg, "dur_predictor_params", path, dict, {})
        dur_path = f"{path}: dur_predictor_params"
        multispkr = _field(cfg, "multispkr", path, bool, False)
        embedding_dim = _field(cfg, "embedding_dim", path, int, 128)
        dilations = _field(cfg, "resblock_dilation_sizes", path, list)
        fields = dict(
            upsample_rates=_ints(cfg, "upsample_rates", path),
            upsample_kernel_sizes=_ints(cfg, "upsample_kernel_sizes", path),
            upsample_initial_channel=_field(cfg, "upsample_initial_channel", path),
            resblock_kernel_sizes=_ints(cfg, "resblock_kernel_sizes", path),
            resblock_dilation_sizes=tuple(_ints({"resblock_dilation_sizes": d}, "resblock_dilation_sizes", path)
                                          for d in dilations),
            num_embeddings=_field(cfg, "num_embeddings", path, int, 1000),
            embedding_dim=embedding_dim,
            duration_hidden=_field(dur, "var_pred_hidden_dim", dur_path, int, 128),
            duration_kernel_size=_field(dur, "var_pred_kernel_size", dur_path, int, 3),
            # fairseq's CodeHiFiGAN defaults: 200 speakers, embedded at the unit-embedding width.
            num_speakers=_field(cfg, "num_speakers", path, int, 200) if multispkr else 0,
            speaker_embedding_dim=_field(cfg, "speaker_embedding_dim", path, int, embedding_dim) if multispkr else 0,
            sample_rate=_field(cfg, "sampling_rate", path, int, 16000),
        )
        try:
            return VocoderConfig(**fields)
        except EchoXError as e:  # a value __post_init__ refuses, named with the file it came from
            raise EchoXError(f"{path}: {e}") from None

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
            "sampling_rate": self.sample_rate,
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
        _split_into_heads(path, cfg, "hidden_size", "num_attention_heads", "the speech adapter")
        units = _field(cfg, "unit_vocab_size", path)
        unit_model = _field(cfg, "unit_model", path, str, None)
        return EchoXConfig(
            llm=llm,
            adapter=AdapterConfig(encoder_dim=whisper_dim, hidden_size=llm.hidden_size, num_heads=llm.num_heads,
                                  ffn_dim=2 * llm.hidden_size, vocab_size=llm.vocab_size, blank_id=blank_id),
            echo=EchoDecoderConfig(llm_hidden_size=llm.hidden_size, aligner_intermediate=aligner_intermediate,
                                   text_vocab_size=llm.vocab_size, unit_vocab_size=units,
                                   body=echo_body_for(unit_model, llm, llm.vocab_size + units)),
            unit_model=unit_model,
            audio_tower=_field(cfg, "audio_tower", path, str, None),
            torch_dtype=_field(cfg, "torch_dtype", path, str, None),
        )


# Released LLM sizes (SPEC §1), for benchmarks with random weights.
ECHOX_8B_LLM = LlamaConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                           intermediate_size=14336, vocab_size=128257, max_position_embeddings=131072,
                           rope_scaling=LLAMA3_ROPE)
ECHOX_3B_LLM = LlamaConfig(hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                           intermediate_size=8192, vocab_size=128257, max_position_embeddings=131072,
                           rope_scaling=LLAMA32_ROPE, tie_word_embeddings=True)
