"""The Whisper encoder against transformers' WhisperEncoder (test-only oracle), fp32."""

import json

import pytest
import torch
from safetensors.torch import load_file

from echox.errors import EchoXError
from echox.mel import log_mel
from echox.whisper import load_whisper

transformers = pytest.importorskip("transformers")


def hf_whisper(cls_name: str, n_mels: int, seed: int = 0):
    """A tiny random transformers Whisper model (encoder and decoder) with every weight randomised."""
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(
        num_mel_bins=n_mels, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=120,
        max_target_positions=32, max_source_positions=1500, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        decoder_start_token_id=3)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # default init has unit norms and zero biases; randomise everything
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def features(n_mels: int, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return log_mel(torch.randn(batch, 50000, generator=gen) * 0.1, n_mels)


@pytest.mark.parametrize("cls_name,n_mels", [("WhisperModel", 80), ("WhisperForConditionalGeneration", 128)])
def test_saved_transformers_model_loads_and_matches(tmp_path, cls_name, n_mels):
    """Both key layouts (`encoder.` and `model.encoder.`); the decoder's weights are ignored."""
    hf = hf_whisper(cls_name, n_mels)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith(("decoder.", "model.decoder.")) for k in load_file(tmp_path / "model.safetensors"))
    ours = load_whisper(tmp_path)
    mel = features(n_mels)
    with torch.no_grad():
        expected = hf.get_encoder()(mel).last_hidden_state
        got = ours(mel)
    assert got.shape == (2, 1500, 64)
    assert (got - expected).abs().max() < 1e-4


def test_tiny_checkpoint_matches_transformers(tiny_root):
    folder = tiny_root / "whisper-tiny"
    ours = load_whisper(folder)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    hf = WhisperEncoder(transformers.WhisperConfig.from_pretrained(folder)).eval()
    state = load_file(folder / "model.safetensors")
    hf.load_state_dict({k.removeprefix("model.encoder."): v for k, v in state.items()})
    mel = features(ours.cfg.num_mel_bins, batch=1)
    with torch.no_grad():
        assert (ours(mel) - hf(mel).last_hidden_state).abs().max() < 1e-4


def test_load_in_bfloat16(tiny_root):
    """A bf16 encoder computes what the fp32 one does, to bf16's precision (a relative error of
    about 1e-2 after its layers; a layer skipped or misread is of order 1)."""
    mel = features(128, batch=1)
    out = load_whisper(tiny_root / "whisper-tiny", dtype=torch.bfloat16)(mel)
    exact = load_whisper(tiny_root / "whisper-tiny")(mel)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape == (1, 1500, 64)
    assert (out.float() - exact).norm() / exact.norm() < 3e-2


def _copy_folder(src, dst, config_change: dict | None = None, drop_prefix: str | None = None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text()) | (config_change or {})
    (dst / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    state = load_file(src / "model.safetensors")
    save_file({k: v for k, v in state.items() if not (drop_prefix and k.startswith(drop_prefix))},
              str(dst / "model.safetensors"))


@pytest.mark.parametrize("change,drop,message", [
    ({"encoder_layers": 3}, None, "missing tensor 'model.encoder.layers.2"),
    ({"encoder_layers": 1}, None, "does not describe: model.encoder.layers.1"),
    ({"d_model": 32}, None, "has shape"),
    (None, "model.encoder.", "no Whisper encoder weights"),
])
def test_mismatched_folders_raise_clear_errors(tiny_root, tmp_path, change, drop, message):
    folder = tmp_path / "bad"
    _copy_folder(tiny_root / "whisper-tiny", folder, change, drop)
    with pytest.raises(EchoXError, match=message):
        load_whisper(folder)


def test_wrong_mel_count_is_refused(tiny_root):
    with pytest.raises(EchoXError, match=r"\[batch, 128, 3000\]"):
        load_whisper(tiny_root / "whisper-tiny")(features(80, batch=1))
