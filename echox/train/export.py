"""A trained model on disk in the released layout, so that `echox chat --model OUT` serves it.

The output folder holds what a released EchoX folder holds: config.json, generation_config.json,
sharded model-*.safetensors with their index, the tokenizer files and the vocoder (copied
untouched). Every tensor of the source checkpoint is written again, in its stored dtype, with
the trained ones replaced by their new values; LoRA is merged into the LLM's projections, so
the folder has no tensor the engine does not know. config.json's `audio_tower` is rewritten so
that it still finds the same Whisper folder from the new place.

The folder is written under a temporary name and renamed at the end: a crash never leaves a
half-written model where a finished one is expected.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from ..adapter import SpeechAdapter
from ..checkpoint import ModelFolder
from ..echo import ECHO_PREFIX
from ..errors import EchoXError
from ..llama import LlamaLM
from ..vocoder import find_vocoder_weights
from ..weights import INDEX_NAME, save_sharded
from .echo_trainer import TrainableEchoDecoder

COPIED_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "vocoder_config.json")


def llm_tensors(lm: LlamaLM) -> dict[str, torch.Tensor]:
    """The decoder layers (LoRA merged); the embeddings and head never train, so they are not listed."""
    return {"model." + k: v for k, v in lm.body.released_tensors().items()}


def adapter_tensors(adapter: SpeechAdapter, source: ModelFolder) -> dict[str, torch.Tensor]:
    """The adapter under its released names. The encoder layer's q/k rows of `in_proj` never act
    (the length-1 attention quirk) and are not kept by `SpeechAdapter`: they come from the source."""
    h = adapter.cfg.hidden_size
    enc, lbm = "model.asr_transformer_encoder.layers.0.", "model.lbm."
    in_weight = source.weights.get(enc + "self_attn.in_proj_weight")  # a copy of its own, written into below
    in_bias = source.weights.get(enc + "self_attn.in_proj_bias")
    in_weight[2 * h:], in_bias[2 * h:] = adapter.layer.value.weight.detach(), adapter.layer.value.bias.detach()
    tensors = {
        "model.mm_projector1.weight": adapter.projector.weight, "model.mm_projector1.bias": adapter.projector.bias,
        enc + "self_attn.in_proj_weight": in_weight, enc + "self_attn.in_proj_bias": in_bias,
        enc + "self_attn.out_proj.weight": adapter.layer.out.weight, enc + "self_attn.out_proj.bias": adapter.layer.out.bias,
        "model.audio_feature_head.weight": adapter.ctc_head.weight,
        lbm + "encoder_attn.in_proj_weight": adapter.lookback.wqkv.weight,
        lbm + "encoder_attn.in_proj_bias": adapter.lookback.wqkv.bias,
        lbm + "encoder_attn.out_proj.weight": adapter.lookback.wo.weight,
        lbm + "encoder_attn.out_proj.bias": adapter.lookback.wo.bias,
    }
    renamed = {"layer.norm1": enc + "norm1", "layer.norm2": enc + "norm2", "layer.linear1": enc + "linear1",
               "layer.linear2": enc + "linear2", "out_norm": "model.out_norm", "lookback_norm": lbm + "atten_layer_norm"}
    modules = dict(adapter.named_modules())
    for ours, released in renamed.items():
        tensors |= {f"{released}.{w}": getattr(modules[ours], w) for w in ("weight", "bias")}
    return tensors


def echo_tensors(decoder: TrainableEchoDecoder) -> dict[str, torch.Tensor]:
    return {ECHO_PREFIX + k: v for k, v in decoder.released_tensors().items()}


def _shard_count(source: ModelFolder) -> int:
    index = source.path / INDEX_NAME
    if index.is_file():
        return len(set(json.loads(index.read_text())["weight_map"].values()))
    return 1


def _vocoder_file(source: ModelFolder) -> Path | None:
    """The file the source folder's vocoder loads from (a converted *.safetensors or the latest g_*), or
    None where the folder holds no usable vocoder: the model is then exported without one, as it came."""
    if not (source.path / "vocoder_config.json").is_file():
        return None
    try:
        return find_vocoder_weights(source.path)
    except EchoXError:
        return None


def save_model(out: Path, source: ModelFolder, trained: dict[str, torch.Tensor], whisper: Path,
               config_updates: dict | None = None, tokenizer_json: Path | None = None):
    """Write `source` with the `trained` tensors replaced (new shapes allowed) to the folder `out`."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {}
    for key in source.weights.keys():
        stored = source.weights.stored(key)  # written out at once: no private copy of the model
        tensors[key] = trained[key].detach().to("cpu", stored.dtype) if key in trained else stored
    save_sharded(tensors, partial, _shard_count(source))
    raw = json.loads((source.path / "config.json").read_text()) | (config_updates or {})
    raw["audio_tower"] = os.path.relpath(whisper.resolve(), out.resolve())
    (partial / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    shutil.copyfile(tokenizer_json or source.path / "tokenizer.json", partial / "tokenizer.json")
    for name in COPIED_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, partial / name)
    vocoder = _vocoder_file(source)
    if vocoder is not None:
        shutil.copyfile(vocoder, partial / vocoder.name)
    if out.exists():
        shutil.rmtree(out)  # only reached when the user asked to overwrite (checked before training)
    partial.rename(out)
