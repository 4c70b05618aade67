"""The offline vocoder: weight-norm folding, the duration rule, loading, errors, conversion."""

import argparse
import fractions
import math
import os
import pickle
import shutil
import zipfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from echox.config import VocoderConfig
from echox.errors import EchoXError
from echox.tiny import TinySpec, random_tensors
from echox.vocoder import (Vocoder, convert_fairseq_vocoder, durations_from_log, fairseq_layout,
                           fold_fairseq_weights, fold_weight_norm, load_vocoder)

TINY = TinySpec().vocoder


def random_vocoder(cfg: VocoderConfig = TINY, seed: int = 0) -> Vocoder:
    raw = random_tensors(fairseq_layout(cfg), torch.Generator().manual_seed(seed))
    return Vocoder.from_weights(cfg, fold_fairseq_weights(raw))


@pytest.mark.parametrize("transposed", [False, True])
def test_folding_equals_torch_weight_norm(transposed):
    torch.manual_seed(0)
    conv = nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2) if transposed else nn.Conv1d(5, 6, 3, padding=1)
    conv = nn.utils.parametrizations.weight_norm(conv)  # dim 0: the output channel, or the input one if transposed
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    with torch.no_grad():
        g.uniform_(0.5, 2.0)
        v.normal_()
    assert g.shape == (conv.weight.shape[0], 1, 1)
    folded = fold_weight_norm(g.detach(), v.detach())
    torch.testing.assert_close(folded, conv.weight.detach(), atol=1e-7, rtol=1e-6)
    x = torch.randn(1, conv.weight.shape[0] if transposed else conv.weight.shape[1], 9)
    op = F.conv_transpose1d if transposed else F.conv1d
    kwargs = {"stride": 4, "padding": 2} if transposed else {"padding": 1}
    torch.testing.assert_close(op(x, folded, conv.bias, **kwargs), conv(x).detach(), atol=1e-6, rtol=1e-6)


def test_duration_rule_on_crafted_log_durations():
    frames = torch.tensor([0.2, 1.4, 1.6, 3.3, 9.7, -0.9])  # exp(logd) - 1
    expected = torch.tensor([1, 1, 2, 3, 10, 1])  # rounded, then at least one frame
    assert torch.equal(durations_from_log(torch.log1p(frames)), expected)
    assert durations_from_log(torch.log1p(frames)).dtype == torch.int64


def test_each_unit_is_repeated_by_its_duration():
    """With the predictor forced to 2.7 -> 3 frames per unit, forward == generate of u0 u0 u0 u1 u1 u1 ..."""
    vocoder = random_vocoder()
    with torch.no_grad():
        vocoder.dur_predictor.proj.weight.zero_()
        vocoder.dur_predictor.proj.bias.fill_(math.log1p(2.7))
    units = torch.tensor([3, 999, 0, 41])
    assert vocoder.durations(units).tolist() == [3, 3, 3, 3]
    wave = vocoder(units)
    assert wave.shape == (12 * TINY.hop_length,)
    repeated = torch.tensor([3, 3, 3, 999, 999, 999, 0, 0, 0, 41, 41, 41])
    torch.testing.assert_close(wave, vocoder.generate(repeated), atol=0, rtol=0)
    assert not torch.allclose(wave, vocoder.generate(units.repeat(3)))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([5, 1000]), "id 1000 at position 1 is out of range 0..999"),
    (torch.tensor([-1, 2]), "id -1 at position 0"),
    (torch.tensor([1.0, 2.0]), "integer unit ids"),
    (torch.tensor([[1, 2]]), "1-D tensor"),
    ([1.7, 2.2], "integer unit ids"),  # a list is not cut to [1, 2]
    ([True, False], "integer unit ids"),
    ([2 ** 63], "integer unit ids"),
])
def test_bad_units_are_refused(bad, message):
    vocoder = random_vocoder()
    for call in (vocoder, vocoder.generate, vocoder.durations):
        with pytest.raises(EchoXError, match=message):
            call(bad)


def reference_wave(raw: dict[str, torch.Tensor], cfg: VocoderConfig, units: torch.Tensor) -> torch.Tensor:
    """fairseq's CodeHiFiGAN forward spelled out on the raw weight-norm pairs (test oracle)."""
    def weight(name):
        return torch._weight_norm(raw[name + ".weight_v"], raw[name + ".weight_g"], 0)

    def conv(x, name, **kw):
        return F.conv1d(x, weight(name), raw[name + ".bias"], **kw)

    def relu_norm(h, name):
        return F.layer_norm(F.relu(h).transpose(1, 2), h.shape[1:2], raw[name + ".weight"], raw[name + ".bias"])

    x = raw["dict.weight"][units].T[None]
    h = relu_norm(F.conv1d(x, raw["dur_predictor.conv1.0.weight"], raw["dur_predictor.conv1.0.bias"], padding=1),
                  "dur_predictor.ln1").transpose(1, 2)
    h = relu_norm(F.conv1d(h, raw["dur_predictor.conv2.0.weight"], raw["dur_predictor.conv2.0.bias"], padding=1),
                  "dur_predictor.ln2")
    log_d = F.linear(h, raw["dur_predictor.proj.weight"], raw["dur_predictor.proj.bias"])[0, :, 0]
    x = torch.repeat_interleave(x, torch.clamp(torch.round(torch.exp(log_d) - 1).long(), min=1), dim=2)
    x = conv(x, "conv_pre", padding=3)
    kernels = cfg.resblock_kernel_sizes
    for i, (rate, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), weight(f"ups.{i}"), raw[f"ups.{i}.bias"], stride=rate,
                               padding=(k - rate) // 2)
        total = 0
        for j, (rk, dilations) in enumerate(zip(kernels, cfg.resblock_dilation_sizes)):
            y, block = x, f"resblocks.{i * len(kernels) + j}"
            for m, d in enumerate(dilations):
                t = conv(F.leaky_relu(y, 0.1), f"{block}.convs1.{m}", dilation=d, padding=d * (rk - 1) // 2)
                y = conv(F.leaky_relu(t, 0.1), f"{block}.convs2.{m}", padding=(rk - 1) // 2) + y
            total = total + y
        x = total / len(kernels)
    return torch.tanh(conv(F.leaky_relu(x, 0.01), "conv_post", padding=3))[0, 0]


def test_tiny_checkpoint_loads_and_matches_the_fairseq_forward(tiny_model_dir):
    vocoder = load_vocoder(tiny_model_dir)
    raw = torch.load(tiny_model_dir / "g_00500000", weights_only=True)["generator"]
    units = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(1))
    wave = vocoder(units)
    assert wave.shape == (int(vocoder.durations(units).sum()) * TINY.hop_length,)
    torch.testing.assert_close(wave, reference_wave(raw, vocoder.cfg, units), atol=1e-5, rtol=0)


def copy_vocoder(src, dst):
    dst.mkdir()
    for name in ("vocoder_config.json", "g_00500000"):
        shutil.copy(src / name, dst / name)
    return dst


def test_converter_round_trips_to_the_same_waveform(tiny_model_dir, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    shutil.copy(tiny_model_dir / "vocoder_config.json", out)
    convert_fairseq_vocoder(tiny_model_dir, out / "vocoder.safetensors")
    with pytest.raises(EchoXError, match="already exists"):
        convert_fairseq_vocoder(tiny_model_dir, out / "vocoder.safetensors")
    convert_fairseq_vocoder(tiny_model_dir, out / "vocoder.safetensors", overwrite=True)
    units = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(load_vocoder(out)(units), load_vocoder(tiny_model_dir)(units))


def test_loader_errors_name_the_problem(tiny_model_dir, tmp_path):
    with pytest.raises(EchoXError, match="vocoder folder not found"):
        load_vocoder(tmp_path / "nowhere")
    folder = copy_vocoder(tiny_model_dir, tmp_path / "voc")
    generator = torch.load(folder / "g_00500000", weights_only=True)["generator"]

    del generator["ups.2.weight_g"]
    torch.save({"generator": generator}, folder / "g_00500000")
    with pytest.raises(EchoXError, match="missing tensor 'ups.2.weight_g'"):
        load_vocoder(folder)

    generator["ups.2.weight_g"] = torch.ones(5, 1, 1)
    torch.save({"generator": generator}, folder / "g_00500000")
    with pytest.raises(EchoXError, match=r"'ups.2.weight_g' has shape \[5, 1, 1\]"):
        load_vocoder(folder)

    (folder / "g_00500000").write_bytes(b"not a checkpoint")
    with pytest.raises(EchoXError, match="not a readable fairseq vocoder checkpoint"):
        load_vocoder(folder)

    (folder / "g_00500000").unlink()
    with pytest.raises(EchoXError, match="no vocoder weights"):
        load_vocoder(folder)

    (folder / "vocoder.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(EchoXError, match="not a readable safetensors file"):
        load_vocoder(folder)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_is_never_run(tiny_model_dir, tmp_path):
    folder = copy_vocoder(tiny_model_dir, tmp_path / "voc")
    payload = _RunsCode()
    payload.marker = str(tmp_path / "code_ran")
    (folder / "g_00500000").write_bytes(pickle.dumps({"generator": payload}, protocol=2))
    with pytest.raises(EchoXError, match="not a readable fairseq vocoder checkpoint") as refused:
        load_vocoder(folder)
    assert not (tmp_path / "code_ran").exists()
    # One line, without torch's advice to load with weights_only=False (which would run the code).
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)


def test_a_fairseq_checkpoint_with_its_args_loads_and_other_classes_are_named(tiny_model_dir, tmp_path):
    """fairseq saves its command line (an argparse.Namespace) beside the weights: plain data, allowed.
    Any other class is refused with the line that names it (no escape codes, no weights_only advice)."""
    folder = copy_vocoder(tiny_model_dir, tmp_path / "voc")
    generator = torch.load(folder / "g_00500000", weights_only=True)["generator"]
    torch.save({"generator": generator, "args": argparse.Namespace(upsample_rates=[5, 4])}, folder / "g_00500000")
    load_vocoder(folder)
    torch.save({"generator": generator, "args": fractions.Fraction(1, 3)}, folder / "g_00500000")
    with pytest.raises(EchoXError, match="Unsupported global: GLOBAL fractions.Fraction") as refused:
        load_vocoder(folder)
    assert "\x1b" not in str(refused.value) and "weights_only" not in str(refused.value)


def test_multi_speaker_vocoder_needs_a_valid_speaker():
    cfg = VocoderConfig(upsample_initial_channel=32, embedding_dim=16, duration_hidden=16,
                        num_speakers=3, speaker_embedding_dim=8)
    vocoder = random_vocoder(cfg)
    units = torch.tensor([4, 8, 15, 16, 23, 42])
    assert not torch.allclose(vocoder(units, speaker=0), vocoder(units, speaker=2))
    for speaker in (None, 3, 1.9, -0.5, True):  # not cut to a speaker id
        with pytest.raises(EchoXError, match="speaker id 0..2"):
            vocoder(units, speaker=speaker)
    with pytest.raises(EchoXError, match="one voice"):
        random_vocoder()(units, speaker=0)


def test_configs_without_exact_upsampling_are_refused():
    with pytest.raises(EchoXError, match="upsample kernel 10 with rate 5"):
        Vocoder(VocoderConfig(upsample_kernel_sizes=(10, 8, 8, 4, 4)))


@pytest.mark.parametrize("key,damage,message", [
    ("dur_predictor.proj.weight", lambda t: t.round().long(), "is stored as int64, but weights are floating point"),
    ("dict.weight", lambda t: t > 0, "is stored as bool, but weights are floating point"),
    ("dict.weight", lambda t: t.tolist(), "is of type list, but weights are tensors"),
    ("dict.weight", lambda t: 5, "is of type int, but weights are tensors"),
])
def test_fairseq_weights_that_are_not_floating_point_tensors_are_named(tiny_model_dir, tmp_path, key, damage,
                                                                       message):
    """Before: an int or bool tensor was cast to float without a word; a list gave an AttributeError."""
    folder = copy_vocoder(tiny_model_dir, tmp_path / "voc")
    generator = torch.load(folder / "g_00500000", weights_only=True)["generator"]
    generator[key] = damage(generator[key])
    torch.save({"generator": generator}, folder / "g_00500000")
    with pytest.raises(EchoXError, match=f"g_00500000: '{key}' {message}"):
        load_vocoder(folder)


def test_converted_vocoder_with_an_integer_tensor_is_named(tiny_model_dir, tmp_path):
    folder = copy_vocoder(tiny_model_dir, tmp_path / "voc")
    convert_fairseq_vocoder(folder, folder / "vocoder.safetensors")
    (folder / "g_00500000").unlink()
    tensors = load_file(str(folder / "vocoder.safetensors"))
    tensors["dur_predictor.proj.weight"] = tensors["dur_predictor.proj.weight"].round().long()
    save_file(tensors, str(folder / "vocoder.safetensors"))
    with pytest.raises(EchoXError, match="'dur_predictor.proj.weight' is stored as I64, but weights are floating"):
        load_vocoder(folder)


def test_compressed_fairseq_checkpoint_is_refused_before_torch_load(tiny_model_dir, tmp_path):
    """A compressed entry lets a small file inflate to any size inside torch.load (a 2 MB file took
    1 GB); torch.save never compresses, so such a file is refused unread."""
    folder = copy_vocoder(tiny_model_dir, tmp_path / "voc")
    with zipfile.ZipFile(tiny_model_dir / "g_00500000") as plain, \
            zipfile.ZipFile(folder / "g_00500000", "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for info in plain.infolist():
            packed.writestr(info.filename, plain.read(info.filename))
    with pytest.raises(EchoXError, match=r"g_00500000: not a checkpoint torch.save wrote: .* is compressed"):
        load_vocoder(folder)
