"""The speech adapter against torch's own TransformerEncoderLayer and MultiheadAttention,
run the way the released code ran them (quirks included)."""

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from echox.adapter import SpeechAdapter, adapter_layout, load_adapter, shrink_keep
from echox.checkpoint import open_model_folder
from echox.config import AdapterConfig
from echox.errors import EchoXError
from echox.tiny import random_tensors

# A tiny vocabulary makes equal neighbouring labels (and blank runs) common.
SMALL = AdapterConfig(encoder_dim=24, hidden_size=32, num_heads=4, ffn_dim=64, vocab_size=5, blank_id=4)


def torch_reference(cfg: AdapterConfig, tensors: dict[str, torch.Tensor], frames: torch.Tensor):
    """SPEC §4 with torch modules: returns (embeddings, kept, labels)."""
    h, enc = cfg.hidden_size, "asr_transformer_encoder.layers.0."
    projector = nn.Linear(2 * cfg.encoder_dim, h)
    layer = nn.TransformerEncoderLayer(h, cfg.num_heads, cfg.ffn_dim, dropout=0.0, activation="relu",
                                       norm_first=True, batch_first=False)
    out_norm, lbm_norm = nn.LayerNorm(h), nn.LayerNorm(h)
    lbm = nn.MultiheadAttention(h, cfg.num_heads, batch_first=True)
    projector.load_state_dict({k.removeprefix("mm_projector1."): v for k, v in tensors.items()
                               if k.startswith("mm_projector1.")})
    layer.load_state_dict({k.removeprefix(enc): v for k, v in tensors.items() if k.startswith(enc)})
    out_norm.load_state_dict({"weight": tensors["out_norm.weight"], "bias": tensors["out_norm.bias"]})
    lbm.load_state_dict({k.removeprefix("lbm.encoder_attn."): v for k, v in tensors.items()
                         if k.startswith("lbm.encoder_attn.")})
    lbm_norm.load_state_dict({"weight": tensors["lbm.atten_layer_norm.weight"],
                              "bias": tensors["lbm.atten_layer_norm.bias"]})
    for module in (layer, lbm):
        module.eval()
    with torch.no_grad():
        x = projector(frames.reshape(-1, 2 * cfg.encoder_dim))[None]  # [1, 750, H], read as (seq 1, batch 750)
        a = out_norm(layer(x))[0]  # [750, H]
        labels = (a @ tensors["audio_feature_head.weight"].T).argmax(-1)
        # Standard-library run detection: the first index of each group of equal labels.
        starts, index = [], 0
        for _, run in itertools.groupby(labels.tolist()):
            starts.append(index)
            index += len(list(run))
        kept = torch.tensor(starts)
        not_kept = torch.ones(1, a.shape[0], dtype=torch.bool)
        not_kept[0, kept] = False
        query = a[kept][None]  # [1, v, H]
        attn, _ = lbm(query, a[None], a[None], key_padding_mask=not_kept, need_weights=False)
        return lbm_norm(attn + query)[0], kept, labels


def runny_frames(cfg: AdapterConfig, pairs: int = 750, seed: int = 0) -> torch.Tensor:
    """[2 * pairs, encoder_dim] Whisper-like frames whose pairs repeat in runs, so labels repeat."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(12, 2 * cfg.encoder_dim, generator=gen)
    lengths = torch.randint(1, 12, (pairs,), generator=gen)
    which = torch.randint(0, 12, (pairs,), generator=gen).repeat_interleave(lengths)[:pairs]
    return patterns[which].reshape(2 * pairs, cfg.encoder_dim)


def small_adapter(seed: int = 0) -> tuple[SpeechAdapter, dict[str, torch.Tensor]]:
    tensors = random_tensors(adapter_layout(SMALL, prefix=""), torch.Generator().manual_seed(seed))
    adapter = SpeechAdapter(SMALL)
    adapter.load_released(tensors)
    return adapter.eval(), tensors


def test_shrink_keeps_the_first_frame_of_every_run_blank_runs_included():
    blank = 9
    labels = torch.tensor([5, 5, 5, blank, blank, 3, 3, blank, 5, 5, 7, blank, blank, blank])
    assert shrink_keep(labels).tolist() == [0, 3, 5, 7, 8, 10, 11]
    assert shrink_keep(torch.tensor([blank] * 6)).tolist() == [0]
    assert shrink_keep(torch.tensor([2])).tolist() == [0]
    assert shrink_keep(torch.tensor([1, 2, 1, 2])).tolist() == [0, 1, 2, 3]
    assert shrink_keep(labels).dtype == torch.int64


def test_framewise_layer_equals_torch_layer_on_a_length_one_batch():
    """The quirk: torch's batch_first=False layer on [1, 750, H] lets each frame see only itself."""
    adapter, tensors = small_adapter()
    enc = "asr_transformer_encoder.layers.0."
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="relu", norm_first=True).eval()
    layer.load_state_dict({k.removeprefix(enc): v for k, v in tensors.items() if k.startswith(enc)})
    x = torch.randn(750, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.layer(x), layer(x[None])[0], atol=1e-5, rtol=0)


def test_small_adapter_matches_torch_reference():
    adapter, tensors = small_adapter(seed=1)
    frames = runny_frames(SMALL)
    with torch.no_grad():
        embeddings, kept = adapter(frames)
        expected, expected_kept, labels = torch_reference(SMALL, tensors, frames)
    assert 1 < kept.numel() < 750 and (labels[kept] == SMALL.blank_id).any()  # the case is not trivial
    assert torch.equal(kept, expected_kept)
    assert embeddings.shape == (kept.numel(), 32)
    assert (embeddings - expected).abs().max() < 1e-5
    torch.testing.assert_close(adapter.ctc_logits(frames).argmax(-1), labels, atol=0, rtol=0)


def test_tiny_checkpoint_adapter_loads_and_matches_torch_reference(tiny_model_dir):
    folder = open_model_folder(tiny_model_dir)
    cfg = folder.config.adapter
    adapter = load_adapter(folder.weights, cfg)
    tensors = folder.weights.take(adapter_layout(cfg), "adapter", strip="model.")
    frames = runny_frames(cfg, seed=2)
    with torch.no_grad():
        embeddings, kept = adapter(frames)
        expected, expected_kept, _ = torch_reference(cfg, tensors, frames)
        logits = adapter.ctc_logits(frames)
    assert logits.shape == (750, cfg.vocab_size)
    assert torch.equal(kept, expected_kept) and kept.numel() < 750
    assert (embeddings - expected).abs().max() < 1e-5


def test_wrong_frame_width_is_refused():
    adapter, _ = small_adapter()
    with pytest.raises(EchoXError, match="width 24"):
        adapter(torch.randn(1500, 64))


def test_adapter_config_that_disagrees_with_the_weights_is_refused(tiny_model_dir):
    folder = open_model_folder(tiny_model_dir)
    wrong = dataclasses.replace(folder.config.adapter, encoder_dim=32)
    with pytest.raises(EchoXError, match="mm_projector1.weight"):
        load_adapter(folder.weights, wrong)


@pytest.mark.parametrize("rows", [7, 64, 1000])
def test_ctc_labels_come_in_chunks_and_equal_the_full_argmax(monkeypatch, rows):
    """The CTC head never runs on more than CTC_ROWS frames at once (no [750, V] logits held)."""
    import echox.adapter as adapter_module
    adapter, _ = small_adapter(seed=3)
    frames = runny_frames(SMALL)
    seen, select = [], adapter_module.head_select
    monkeypatch.setattr(adapter_module, "CTC_ROWS", rows)
    monkeypatch.setattr(adapter_module, "head_select", lambda h, *a: seen.append(h.shape[0]) or select(h, *a))
    with torch.no_grad():
        features = adapter.frame_features(frames)
        labels = adapter.ctc_labels(features)
        expected = adapter.ctc_logits(frames).argmax(-1)
    assert torch.equal(labels, expected)
    assert max(seen) == min(rows, 750) and sum(seen) == 750
