"""Whisper's log-mel front end (SPEC §2): 30 s of 16 kHz audio -> [n_mels, 3000] features.

STFT with a periodic Hann window of 400 samples and hop 160 (10 ms frames), power spectrum,
Slaney mel filters over 0..8000 Hz with area normalisation, log10, a dynamic-range floor 8
decades below the loudest value of the window, then the fixed affine map (L + 4) / 4.
"""

import functools
import math

import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # 480000
FRAMES = WINDOW_SAMPLES // HOP  # 3000

# Slaney's mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above.
LINEAR_HZ_PER_MEL = 200.0 / 3
BREAK_HZ = 1000.0
BREAK_MEL = BREAK_HZ / LINEAR_HZ_PER_MEL  # 15
LOG_STEP = math.log(6.4) / 27  # log(Hz ratio) per mel above the break


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    log_part = BREAK_MEL + torch.log(hz.clamp(min=BREAK_HZ) / BREAK_HZ) / LOG_STEP
    return torch.where(hz < BREAK_HZ, hz / LINEAR_HZ_PER_MEL, log_part)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    log_part = BREAK_HZ * torch.exp(LOG_STEP * (mel.clamp(min=BREAK_MEL) - BREAK_MEL))
    return torch.where(mel < BREAK_MEL, mel * LINEAR_HZ_PER_MEL, log_part)


@functools.cache  # the same few filterbanks serve every utterance; callers must not modify them
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                f_max: float = SAMPLE_RATE / 2) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, evenly spaced in Slaney mels over 0..f_max,
    each scaled by 2 / (its width in Hz) so that every filter has the same area."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges_hz = mel_to_hz(torch.linspace(0, hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(),
                                        n_mels + 2, dtype=torch.float64))  # [n_mels + 2]
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz - lower) / (centre - lower)
    falling = (upper - fft_hz) / (upper - centre)
    triangles = torch.minimum(rising, falling).clamp(min=0)
    return (triangles * (2 / (upper - lower))).float()


def log_mel(samples: torch.Tensor, n_mels: int) -> torch.Tensor:
    """16 kHz samples [N] or [B, N] -> Whisper features [B, n_mels, 3000] (padded or cut to 30 s)."""
    x = samples.float().reshape(-1, samples.shape[-1])[:, :WINDOW_SAMPLES]
    x = torch.nn.functional.pad(x, (0, WINDOW_SAMPLES - x.shape[-1]))  # [B, 480000]
    window = torch.hann_window(N_FFT, periodic=True, device=x.device)
    spectrum = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect",
                          return_complex=True)  # [B, 201, 3001]
    power = spectrum[..., :FRAMES].abs() ** 2  # the last frame is dropped, as Whisper does
    mel = mel_filters(n_mels).to(x.device) @ power  # [B, n_mels, 3000]
    log = mel.clamp(min=1e-10).log10()
    loudest = log.amax(dim=(-2, -1), keepdim=True)
    return (torch.maximum(log, loudest - 8.0) + 4.0) / 4.0
