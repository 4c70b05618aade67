"""A stand-in for the HuBERT unit extractor, for the demo only: k-means of log-mel frames.

EchoX's units are mHuBERT layer-11 features quantised by a 1000-centroid k-means, one unit per
20 ms; mHuBERT cannot be downloaded here, so the demo quantises something simpler at the same
rate: 40-band log-mel frames (hop 320 samples = 20 ms), k-means with a few dozen centroids fitted
on the demo's own answers. Runs of the same unit are merged into one, as the released units are
(the vocoder's duration predictor restores the lengths). The units carry the coarse spectral
shape of the speech, which is all the demo needs: a deterministic target that depends on the
answer. They are not HuBERT units, and the tiny vocoder cannot speak them intelligibly.
"""

import torch

from ..mel import mel_filters

UNIT_HOP = 320  # samples per unit at 16 kHz: 20 ms, the released unit rate
WINDOW = 640
BANDS = 40


def log_mel_frames(samples: torch.Tensor) -> torch.Tensor:
    """16 kHz samples [N] -> log-mel frames [N / 320, 40]."""
    spectrum = torch.stft(samples.float(), WINDOW, UNIT_HOP, window=torch.hann_window(WINDOW),
                          center=True, return_complex=True).abs() ** 2  # [321, frames]
    mel = mel_filters(BANDS, n_fft=WINDOW) @ spectrum
    return mel.clamp(min=1e-8).log().T


def fit_centroids(frames: torch.Tensor, count: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """Lloyd's k-means over frames [F, D] -> centroids [count, D], started from seeded frames."""
    gen = torch.Generator().manual_seed(seed)
    centroids = frames[torch.randperm(len(frames), generator=gen)[:count]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(frames, centroids).argmin(1)
        for k in range(len(centroids)):
            members = frames[nearest == k]
            if len(members):  # an empty cluster keeps its centroid
                centroids[k] = members.mean(0)
    return centroids


def units_of(samples: torch.Tensor, centroids: torch.Tensor) -> list[int]:
    """Speech -> deduplicated unit ids: the nearest centroid per 20 ms frame, runs merged."""
    nearest = torch.cdist(log_mel_frames(samples), centroids).argmin(1)
    return torch.unique_consecutive(nearest).tolist()
