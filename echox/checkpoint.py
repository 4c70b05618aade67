"""An EchoX model folder: config.json + tokenizer + sharded weights, and where its parts live.

Sizes that config.json does not state are read off the weights' headers (no tensor is loaded):
the aligner width, the Whisper width the adapter expects, and the echo decoder's depth and
width, which must agree with the `unit_model` rule or loading stops with both sides named.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from .adapter import adapter_layout
from .config import EchoXConfig, read_json, require_folder
from .echo import ECHO_PREFIX as ECHO
from .echo import echo_layout
from .errors import EchoXError
from .llama import lm_layout
from .tokenizer import Tokenizer
from .weights import Checkpoint


@dataclass
class ModelFolder:
    path: Path
    config: EchoXConfig
    tokenizer: Tokenizer
    weights: Checkpoint

    def layouts(self):
        cfg = self.config
        return [lm_layout(cfg.llm), adapter_layout(cfg.adapter), echo_layout(cfg.echo)]


def _layer_count(weights: Checkpoint, prefix: str) -> int:
    """How many distinct `{prefix}model.layers.<i>.` indices the weights hold."""
    pattern = re.compile(re.escape(prefix) + r"model\.layers\.(\d+)\.")
    return len({m.group(1) for key in weights.keys() if (m := pattern.match(key))})


def _echo_depth_and_width(weights: Checkpoint) -> tuple[int, int]:
    return _layer_count(weights, ECHO), weights.matrix_shape(ECHO + "adapter.weight")[0]


def open_model_folder(path: Path | str) -> ModelFolder:
    path = Path(path)
    require_folder(path, "model folder")
    raw = read_json(path / "config.json")
    tokenizer = Tokenizer(path)
    weights = Checkpoint(path)
    config = EchoXConfig.parse(
        raw, path / "config.json", blank_id=tokenizer.audio_patch,
        aligner_intermediate=weights.matrix_shape(ECHO + "aligner_MLP.0.weight")[0],
        whisper_dim=weights.matrix_shape("model.mm_projector1.weight")[1] // 2)
    # Compared before any layout is built: a layout of a million layers takes half a minute and GBs.
    llm_depth = _layer_count(weights, "")
    if llm_depth != config.llm.num_layers:
        raise EchoXError(f"{path / 'config.json'}: num_hidden_layers is {config.llm.num_layers}, but the weights "
                         f"hold {llm_depth} LLM layers")
    body = config.echo.body
    depth, width = _echo_depth_and_width(weights)
    if (depth, width) != (body.num_layers, body.hidden_size):
        raise EchoXError(f"{path / 'config.json'}: unit_model={config.unit_model!r} means an echo decoder of "
                         f"{body.num_layers} layers x {body.hidden_size}, but the weights hold {depth} x {width}")
    if tokenizer.audio_patch != config.llm.vocab_size - 1:
        raise EchoXError(f"{tokenizer.path}: <audio_patch> has id {tokenizer.audio_patch}, expected the last "
                         f"text id {config.llm.vocab_size - 1} (vocab_size in config.json)")
    folder = ModelFolder(path, config, tokenizer, weights)
    for layout, what in zip(folder.layouts(), ("LLM", "speech adapter", "echo decoder")):
        weights.check(layout, what)  # headers only: every missing key or bad shape is found before loading
    # A tied model (EchoX-3B) reads its output head from the embeddings, as the reference does, so a
    # stored copy of the head is ignored rather than refused.
    weights.check_fully_used(folder.layouts(), ("lm_head.weight",) if config.llm.tie_word_embeddings else ())
    return folder


def resolve_whisper(model: ModelFolder, explicit: Path | str | None) -> Path:
    """The Whisper folder: the one given, else config.json `audio_tower` (relative to the model
    folder, or a hub id whose last part is looked for beside the model folder)."""
    if explicit is not None:
        candidates = [Path(explicit)]
    elif model.config.audio_tower:
        tower = Path(model.config.audio_tower)
        candidates = [model.path / tower, tower, model.path.parent / tower.name]
    else:
        candidates = [model.path.parent / "whisper-large-v3"]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder.resolve()
    if explicit is not None:  # the user's own folder: what it lacks, not advice to pass it
        raise EchoXError(f"{explicit}: not a Whisper encoder folder (no config.json in it)")
    tried = ", ".join(str(c) for c in candidates)
    raise EchoXError(f"no Whisper encoder folder found (tried {tried}); pass --whisper DIR")


def resolve_vocoder(model: ModelFolder, explicit: Path | str | None) -> Path:
    """The vocoder folder: the one given, else the model folder itself (as released), else ./vocoder beside it."""
    candidates = [Path(explicit)] if explicit is not None else [model.path, model.path.parent / "vocoder"]
    for folder in candidates:
        if (folder / "vocoder_config.json").is_file():
            return folder.resolve()
    if explicit is not None:
        raise EchoXError(f"{explicit}: not a vocoder folder (no vocoder_config.json in it, which a converted "
                         f"vocoder.safetensors needs beside it too)")
    tried = ", ".join(str(c) for c in candidates)
    raise EchoXError(f"no vocoder found (no vocoder_config.json in {tried}); pass --vocoder DIR")
