"""An EchoX `Engine` with random weights at a named size, built without writing a checkpoint.

Sizes: "tiny" (TinySpec), "voice" (tiny, but the released echo decoder "small" and vocoder),
"mid" (runs in seconds on a CPU), "3b" and "8b" (the released shapes:
Llama-3.2-3B / Llama-3.1-8B, Whisper-large-v3, the adapter, the echo decoder the `unit_model`
rule gives, 8000 unit tokens, the released vocoder config).

Only the files are skipped. The config goes through `EchoXConfig.parse` as a config.json would,
the tokenizer is a real `tokenizers` file read by `echox.tokenizer.Tokenizer`, and every module
is filled through its own loader (`load_released`, `load_adapter`, `load_echo_decoder`,
`Vocoder.from_weights`) from the released layouts. `RandomCheckpoint` stands in for the
safetensors index: its `take` hands out random tensors, created directly on the target device
in the target dtype (8B in bf16 is 16 GB: drawing it on the CPU in fp32 would take minutes).

At "3b" and "8b" the tokenizer has the released ids (BOS 128000, eot 128009, `<audio_patch>`
128256, units from 128257), so the echo decoder's 12800 prefix quirk is the path exercised.
"""

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from echox.adapter import load_adapter
from echox.checkpoint import ModelFolder
from echox.config import (ECHOX_3B_LLM, ECHOX_8B_LLM, WHISPER_LARGE_V3, EchoXConfig,
                          LlamaConfig, VocoderConfig, WhisperConfig)
from echox.echo import load_echo_decoder
from echox.engine import Engine, resolve_device, resolve_dtype
from echox.llama import load_lm
from echox.tiny import TinySpec, random_tensor, tiny_tokenizer
from echox.tokenizer import Tokenizer
from echox.vocoder import Vocoder, folded_layout
from echox.weights import Layout
from echox.whisper import WhisperEncoder, whisper_layout



@dataclass(frozen=True)
class BenchSize:
    llm: LlamaConfig  # vocab_size is replaced by the tokenizer's text vocabulary
    unit_model: str | None  # config.json `unit_model`: picks the echo decoder body (SPEC §7)
    unit_vocab_size: int
    whisper: WhisperConfig
    vocoder: VocoderConfig
    released_vocab: bool  # Llama-3 ids (128000.. specials) rather than specials right after the bytes


_TINY = TinySpec()
TINY = BenchSize(
    LlamaConfig(hidden_size=_TINY.hidden_size, num_layers=_TINY.num_layers, num_heads=_TINY.num_heads,
                num_kv_heads=_TINY.num_kv_heads, head_dim=_TINY.hidden_size // _TINY.num_heads,
                intermediate_size=_TINY.intermediate_size, vocab_size=0, max_position_embeddings=4096),
    _TINY.unit_model, _TINY.unit_vocab_size, _TINY.whisper, _TINY.vocoder,
    released_vocab=False)
SIZES = {
    "tiny": TINY,
    # The tiny LLM and Whisper with the released speech output: the "small" echo decoder (4 x 512)
    # and the released CodeHiFiGAN (13.5 M parameters), where a CPU turn spends its time.
    "voice": dataclasses.replace(TINY, unit_model="small", unit_vocab_size=1024, vocoder=VocoderConfig()),
    "mid": BenchSize(
        LlamaConfig(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
                    vocab_size=0, max_position_embeddings=4096),
        "large", 1024,  # "large" = 2 layers at the LLM width (512): the rule size nearest "small and fast"
        WhisperConfig(num_mel_bins=128, d_model=384, num_layers=4, num_heads=6, ffn_dim=1536),
        VocoderConfig(upsample_initial_channel=128), released_vocab=False),
    # Released shapes; the aligner MLP is as wide as the LLM's feed-forward layer, as released.
    "3b": BenchSize(ECHOX_3B_LLM, None, 8000, WHISPER_LARGE_V3, VocoderConfig(), released_vocab=True),
    "8b": BenchSize(ECHOX_8B_LLM, "8x768", 8000, WHISPER_LARGE_V3, VocoderConfig(), released_vocab=True),
}


def unit_token_strings(count: int) -> list[str]:
    """`count` distinct unit-language tokens: ids below 1000 spell one unit, the rest two."""
    return ["<|unit_" + (f"{k}" if k < 1000 else f"{k // 1000}_{k % 1000}") + "|>" for k in range(count)]


def load_tokenizer(hf: HFTokenizer) -> Tokenizer:
    """An `echox.tokenizer.Tokenizer` over `hf`, read back from a tokenizer.json as a model folder's is."""
    with tempfile.TemporaryDirectory() as folder:
        hf.save(str(Path(folder) / "tokenizer.json"))
        return Tokenizer(folder)


def config_json(llm: LlamaConfig, unit_vocab_size: int, unit_model: str | None) -> dict:
    """The config.json fields `EchoXConfig.parse` reads, for an LLM of `llm`'s shape."""
    scaling = llm.rope_scaling
    raw = {
        "hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.head_dim,
        "intermediate_size": llm.intermediate_size, "vocab_size": llm.vocab_size,
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta, "tie_word_embeddings": llm.tie_word_embeddings,
        "rope_scaling": None if scaling is None else {"rope_type": "llama3", **dataclasses.asdict(scaling)},
        "unit_vocab_size": unit_vocab_size,
    }
    return raw | ({"unit_model": unit_model} if unit_model is not None else {})


class RandomCheckpoint:
    """Stands in for `echox.weights.Checkpoint`: `take` returns fresh random tensors of a layout."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def take(self, layout: Layout, what: str, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu", strip: str = "") -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return {key.removeprefix(strip): random_tensor(key, shape, self.generators[device],
                                                       dtype or torch.float32, device)
                for key, shape in layout.items()}


def model_folder(size: BenchSize, seed: int) -> ModelFolder:
    """What `open_model_folder` would give for a checkpoint of this size, without one."""
    tokenizer = load_tokenizer(tiny_tokenizer(unit_token_strings(size.unit_vocab_size), size.released_vocab))
    llm = dataclasses.replace(size.llm, vocab_size=tokenizer.audio_patch + 1)
    path = Path("random") / "config.json"
    config = EchoXConfig.parse(config_json(llm, size.unit_vocab_size, size.unit_model), path,
                               blank_id=tokenizer.audio_patch, aligner_intermediate=llm.intermediate_size,
                               whisper_dim=size.whisper.d_model)
    return ModelFolder(path.parent, config, tokenizer, RandomCheckpoint(seed))


def build_engine(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 seed: int = 0, graphs: bool = True) -> Engine:
    """A random-weight Engine of size `name` (see SIZES) on `device` (bf16 on CUDA, fp32 on CPU)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    size = SIZES[name]
    folder = model_folder(size, seed)
    weights = folder.weights
    with torch.device("meta"):  # every parameter is replaced by a taken tensor: no init
        whisper = WhisperEncoder(size.whisper)
    whisper.load_released(weights.take(whisper_layout(size.whisper, prefix=""), "Whisper encoder", dtype, device))
    adapter = load_adapter(weights, folder.config.adapter, dtype, device)
    vocoder = Vocoder.from_weights(size.vocoder, weights.take(folded_layout(size.vocoder), "vocoder",
                                                              torch.float32, device), "random", torch.float32, device)
    return Engine(folder, load_lm(weights, folder.config.llm, dtype, device), adapter, whisper.eval(),
                  load_echo_decoder(folder, dtype, device), vocoder, folder.path, folder.path, device,
                  dtype).prepare(graphs)
