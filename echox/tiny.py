"""Tiny random EchoX checkpoints in the released layout, for tests and the demo.

`write_tiny_checkpoint(root)` writes, from a seed:
  root/EchoX-tiny/   config.json, generation_config.json, sharded model-*.safetensors + index,
                     tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                     the vocoder g_00500000 (fairseq-style pickle) and vocoder_config.json
  root/whisper-tiny/ config.json, model.safetensors (Hugging Face key names, `model.` prefix)
  each folder's contents.sha256: its files' SHA-256 (`sha256sum -c` reads it), written last
The weights are random, so the model's text is gibberish and its speech is noise; every name,
shape, file and quirk is the released one. Each folder is written under a temporary name and
renamed into place once complete, so an interrupted run (Ctrl-C in the first `echox demo`)
never leaves a partial model where a later run looks; `is_complete` checks a cached one against
its digests, so a file damaged since (a full disk, a stray `truncate`) is rebuilt, not reported
on every run. The tokenizer is byte-level BPE over the 256 bytes
(no merges), then the Llama-3 special tokens, `<audio_patch>`, and unit-language tokens.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .adapter import adapter_layout
from .config import AUDIO_PATCH_TOKEN, EchoXConfig, VocoderConfig, WhisperConfig
from .echo import echo_layout
from .llama import lm_layout
from .tokenizer import BOS, END_HEADER, EOT, LLAMA3_BOS_ID, START_HEADER
from .outputs import atomic_folder
from .vocoder import fairseq_layout
from .weights import INDEX_NAME, Layout, save_safetensors, save_sharded
from .whisper import whisper_layout

# Bumped whenever the generated files change, so a cached tiny model of an older layout is not reused.
LAYOUT_VERSION = 2
MODEL_FOLDER, WHISPER_FOLDER = "EchoX-tiny", "whisper-tiny"
DIGESTS = "contents.sha256"
MODEL_FILES = ("config.json", "generation_config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "g_00500000", "vocoder_config.json")
WHISPER_FILES = ("config.json", "model.safetensors")
LLAMA3_SPECIAL_COUNT = 256  # ids 128000..128255 in the released vocabulary
LLAMA3_SPECIALS = [BOS, "<|end_of_text|>", START_HEADER, END_HEADER, "<|eom_id|>", EOT]
EMBEDDING_TABLES = ("embed_tokens.weight", "unit_embedding.weight", "dict.weight", "embed_positions.weight",
                    "spkr.weight")


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    unit_vocab_size: int = 48
    unit_model: str | None = "large"  # 2 layers at LLM width: the only rule size that stays tiny
    tie_word_embeddings: bool = False
    whisper: WhisperConfig = WhisperConfig(num_mel_bins=128, d_model=64, num_layers=2, num_heads=4, ffn_dim=128)
    vocoder: VocoderConfig = VocoderConfig(upsample_initial_channel=64, embedding_dim=32, duration_hidden=32)
    shards: int = 2


def tiny_tokenizer(unit_tokens: list[str], released_ids: bool = False) -> HFTokenizer:
    """Byte-level BPE over the 256 bytes (no merges), the Llama-3 specials, `<audio_patch>`, then
    the unit tokens. With `released_ids` the byte vocabulary is padded with never-produced filler
    entries so that the 256 specials land on their Llama-3 ids (BOS 128000 ... <audio_patch> 128256)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = LLAMA3_SPECIALS
    if released_ids:
        vocab |= {f"<filler_{i}>": i for i in range(len(vocab), LLAMA3_BOS_ID)}
        named = {0: BOS, 1: "<|end_of_text|>", 6: START_HEADER, 7: END_HEADER, 8: "<|eom_id|>", 9: EOT}
        specials = [named.get(i, f"<|reserved_special_token_{i}|>") for i in range(LLAMA3_SPECIAL_COUNT)]
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_special_tokens([AddedToken(AUDIO_PATCH_TOKEN, special=True, normalized=False)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in unit_tokens])
    return tokenizer


def random_unit_tokens(count: int, gen: torch.Generator) -> list[str]:
    """Strings like <|unit_12_345|>: one to three HuBERT units each; a few carry an
    out-of-range value (>= 1000) that the unit table must drop."""
    tokens = []
    for k in range(count):
        n = 1 + k % 3
        units = torch.randint(0, 1000, (n,), generator=gen).tolist()
        if k % 16 == 15:
            units[-1] = 1000 + units[-1]
        tokens.append("<|unit_" + "_".join(map(str, units)) + "|>")
    return list(dict.fromkeys(tokens))  # duplicates would collapse into one id


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A value that keeps activations O(1): norms near 1, weights ~ 1/sqrt(fan_in); drawn on `device`."""
    noise = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    if key.endswith(EMBEDDING_TABLES):
        return noise
    if len(shape) == 1 and key.endswith(".weight"):  # a norm's gain
        return noise.mul_(0.1).add_(1)
    if len(shape) == 1:  # a bias
        return noise.mul_(0.02)
    if key.endswith(".weight_g"):
        return noise.abs_().mul_(0.1).add_(1)
    return noise.mul_(1 / math.sqrt(math.prod(shape[1:])))


def random_tensors(layout: Layout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {key: random_tensor(key, shape, gen) for key, shape in layout.items()}


def _write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _llm_config_json(spec: TinySpec, vocab: int) -> dict:
    return {
        "architectures": ["EchoXForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        # A small original context so that the llama3 scaling changes some tiny-model frequencies.
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "float32",
        "audio_tower": "../whisper-tiny",
        "unit_vocab_size": spec.unit_vocab_size,
        **({"unit_model": spec.unit_model} if spec.unit_model is not None else {}),
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _write_tokenizer(folder: Path, tokenizer: HFTokenizer):
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT, "pad_token": EOT})
    _write_json(folder / "tokenizer_config.json", {"bos_token": BOS, "eos_token": EOT, "pad_token": EOT,
                                                   "model_max_length": 131072,
                                                   "tokenizer_class": "PreTrainedTokenizerFast"})


def _write_whisper(folder: Path, cfg: WhisperConfig, gen: torch.Generator):
    folder.mkdir(parents=True, exist_ok=True)
    # Hugging Face saves WhisperForConditionalGeneration with a leading `model.`.
    tensors = random_tensors(whisper_layout(cfg, prefix="model.encoder."), gen)
    save_safetensors(tensors, folder / "model.safetensors")
    _write_json(folder / "config.json", {
        "model_type": "whisper", "num_mel_bins": cfg.num_mel_bins, "d_model": cfg.d_model,
        "encoder_layers": cfg.num_layers, "encoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.ffn_dim, "max_source_positions": cfg.max_source_positions,
        "decoder_layers": cfg.num_layers, "decoder_attention_heads": cfg.num_heads,
        "decoder_ffn_dim": cfg.ffn_dim, "activation_function": "gelu"})


def _write_model(model_dir: Path, spec: TinySpec, gen: torch.Generator):
    tokenizer = tiny_tokenizer(random_unit_tokens(spec.unit_vocab_size, gen))
    text_vocab = tokenizer.token_to_id(AUDIO_PATCH_TOKEN) + 1
    units = tokenizer.get_vocab_size() - text_vocab
    raw = _llm_config_json(spec, text_vocab) | {"unit_vocab_size": units}
    # The released aligner MLP is as wide as the LLM's feed-forward layer.
    config = EchoXConfig.parse(raw, model_dir / "config.json", blank_id=text_vocab - 1,
                               aligner_intermediate=spec.intermediate_size, whisper_dim=spec.whisper.d_model)
    tensors = {}
    for layout in (lm_layout(config.llm), adapter_layout(config.adapter), echo_layout(config.echo)):
        tensors |= random_tensors(layout, gen)
    save_sharded(tensors, model_dir, spec.shards)
    _write_json(model_dir / "config.json", raw)
    _write_json(model_dir / "generation_config.json", {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512})
    _write_tokenizer(model_dir, tokenizer)
    torch.save({"generator": random_tensors(fairseq_layout(spec.vocoder), gen)}, model_dir / "g_00500000")
    _write_json(model_dir / "vocoder_config.json", spec.vocoder.to_json())


def write_tiny_checkpoint(root: Path | str, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Write the tiny model under `root` (replacing an older one) and return the EchoX model folder."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    with atomic_folder(root / MODEL_FOLDER) as model_dir:
        _write_model(model_dir, spec, gen)
        _seal(model_dir)
    with atomic_folder(root / WHISPER_FOLDER) as whisper_dir:
        _write_whisper(whisper_dir, spec.whisper, gen)
        _seal(whisper_dir)
    return root / MODEL_FOLDER


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    """name (relative to `folder`) -> the file's SHA-256."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def _seal(folder: Path):
    """Write the folder's DIGESTS, of every file in it, last."""
    names = [str(path.relative_to(folder)) for path in sorted(folder.rglob("*")) if path.is_file()]
    (folder / DIGESTS).write_text("".join(f"{digest}  {name}\n" for name, digest in _digests(folder, names).items()))


def _listed(folder: Path) -> dict[str, str]:
    """name -> SHA-256, as the folder's DIGESTS lists them."""
    return dict(reversed(line.split("  ", 1)) for line in (folder / DIGESTS).read_text().splitlines())


def _intact(folder: Path, required: tuple[str, ...]) -> bool:
    """Every file the folder's DIGESTS lists is as written, the required ones among them (files
    added since are not the checkpoint's)."""
    try:
        listed = _listed(folder)
        return all(name in listed for name in required) and _digests(folder, list(listed)) == listed
    except (OSError, ValueError):  # no digests (a build cut short, or an older echox's), or a file gone
        return False


def as_written(folder: Path) -> bool:
    """Whether `folder` holds exactly the files echox wrote there, unchanged: only such a folder may
    `echox tiny --overwrite` delete (a file added since, a link or an edit is the user's)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        entries = list(folder.iterdir())
        plain_files = all(path.is_file() and not path.is_symlink() for path in entries)
        return (plain_files and {path.name for path in entries} == {*_listed(folder), DIGESTS}
                and _intact(folder, ()))
    except (OSError, ValueError):
        return False


def is_complete(root: Path) -> bool:
    """Whether `root` holds a whole tiny checkpoint, each of its files as written."""
    return _intact(root / MODEL_FOLDER, MODEL_FILES) and _intact(root / WHISPER_FOLDER, WHISPER_FILES)
