"""The log-mel front end against transformers' WhisperFeatureExtractor (test-only oracle)."""

import shutil
import subprocess

import pytest
import torch

from echox.audio import load_audio
from echox.mel import log_mel, mel_filters

transformers = pytest.importorskip("transformers")


def reference_features(samples: torch.Tensor, n_mels: int) -> torch.Tensor:
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000)
    batch = [row.numpy() for row in samples.reshape(-1, samples.shape[-1])]
    return extractor(batch, sampling_rate=16000, return_tensors="pt").input_features


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> torch.Tensor:
    """Speech from espeak-ng (22.05 kHz WAV), loaded and resampled by load_audio."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True)
    return load_audio(path)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filterbank_matches_slaney_reference(n_mels):
    from transformers.audio_utils import mel_filter_bank
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")
    torch.testing.assert_close(mel_filters(n_mels).double(), torch.from_numpy(ref).T, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_speech_features_match_transformers(speech, n_mels):
    ours = log_mel(speech, n_mels)
    assert ours.shape == (1, n_mels, 3000)
    assert (ours - reference_features(speech, n_mels)).abs().max() < 1e-4


@pytest.mark.parametrize("n_mels", [80, 128])
def test_noise_batch_matches_transformers(n_mels):
    gen = torch.Generator().manual_seed(0)
    # Unequal loudness: the dynamic-range floor is per utterance, not per batch.
    noise = torch.randn(2, 120000, generator=gen) * torch.tensor([[0.3], [0.001]])
    ours = log_mel(noise, n_mels)
    assert (ours - reference_features(noise, n_mels)).abs().max() < 1e-4
    torch.testing.assert_close(ours[1:], log_mel(noise[1], n_mels), atol=0, rtol=0)


def test_longer_than_30_seconds_is_cut_and_silence_is_flat():
    x = torch.randn(31 * 16000) * 0.1
    torch.testing.assert_close(log_mel(x, 80), log_mel(x[:480000], 80), atol=0, rtol=0)
    silence = log_mel(torch.zeros(5), 80)  # log10(1e-10) = -10 everywhere -> (-10 + 4) / 4
    assert torch.equal(silence, torch.full((1, 80, 3000), -1.5))
