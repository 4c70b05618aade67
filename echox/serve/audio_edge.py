"""Audio at the protocol's edge: base64 pcm16 at 24 kHz on the wire, float32 at 16 kHz in the engine.

Input needs no streaming: a committed buffer is handed to the engine whole, as (samples, 24000),
and the engine resamples it like any other audio. Output must stream: each engine chunk is
resampled as it arrives, and the concatenated result equals `audio.resample` of the whole answer.
That works because each output sample of the windowed-sinc filter reads only the input within
`reach` samples of its position: `StreamingResampler` keeps a short tail of input, recomputes
the few outputs near the seam, and emits only outputs whose window is complete. Its delay is
`reach` input samples (3.3 ms at 16 -> 24 kHz).
"""

import base64
import binascii

import torch

from ..audio import SAMPLE_RATE, resample, resampling_plan
from .protocol import ProtocolError

API_RATE = 24000  # the Realtime API's pcm16 rate, both directions
PCM16_SCALE = 32768


def pcm16_from_base64(data: object, param: str) -> bytes:
    """The raw little-endian pcm16 bytes of a base64 field, or a ProtocolError naming `param`."""
    if not isinstance(data, str):
        raise ProtocolError("invalid_value", f"{param} must be a base64 string of pcm16 audio", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"{param} is not valid base64", param) from None
    if len(raw) % 2:
        raise ProtocolError("invalid_audio", f"{param} holds {len(raw)} bytes: pcm16 needs whole 2-byte samples",
                            param)
    return raw


def samples_from_pcm16(raw: bytes) -> torch.Tensor:
    """Little-endian pcm16 bytes -> [n] float32 in [-1, 1) (no bytes: no samples)."""
    if not raw:  # torch.frombuffer refuses an empty buffer
        return torch.zeros(0)
    return torch.frombuffer(bytearray(raw), dtype=torch.int16).float() / PCM16_SCALE


def pcm16_bytes(samples: torch.Tensor) -> bytes:
    """[n] float samples -> little-endian pcm16, clipped to [-1, 1] and rounded as `write_wav` does."""
    pcm = (samples.float().clamp(-1, 1) * (PCM16_SCALE - 1)).round().to(torch.int16)
    return pcm.numpy().astype("<i2").tobytes()


def pcm16_base64(samples: torch.Tensor) -> str:
    return base64.b64encode(pcm16_bytes(samples)).decode("ascii")


def filter_reach(orig_sr: int, new_sr: int) -> tuple[int, int, int]:
    """(up, down, reach): output m sits at input position m * down / up and reads the input samples
    within `reach` of floor(m / up) * down (the half-length `audio.resample` gives its filter)."""
    up, down, _, reach = resampling_plan(orig_sr, new_sr)
    return up, down, reach


class StreamingResampler:
    """Chunks in at `orig_sr`, chunks out at `new_sr`; all chunks together equal `resample(whole)`."""

    def __init__(self, orig_sr: int = SAMPLE_RATE, new_sr: int = API_RATE):
        self.orig_sr, self.new_sr = orig_sr, new_sr
        self.up, self.down, self.reach = filter_reach(orig_sr, new_sr)
        self.tail = torch.zeros(0)  # input from sample `base` on; `base` is a multiple of `down`
        self.base = 0
        self.received = 0  # input samples so far
        self.emitted = 0  # output samples so far

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """The outputs that `samples` completes (those whose filter window lies inside the input so far)."""
        self.tail = torch.cat([self.tail, samples.float().reshape(-1)])
        self.received += samples.numel()
        # Output block q (outputs q*up .. q*up+up-1) reads input up to q*down + down + reach.
        complete_blocks = max(0, (self.received - self.reach - self.down) // self.down + 1)
        return self._emit(complete_blocks * self.up)

    def flush(self) -> torch.Tensor:
        """The remaining outputs, reading zeros past the end as offline resampling does."""
        return self._emit(-(-self.received * self.up // self.down))

    def _emit(self, end: int) -> torch.Tensor:
        if end <= self.emitted or self.received == 0:
            return torch.zeros(0)
        first = self.base * self.up // self.down  # the output at the tail's first sample
        out = resample(self.tail, self.orig_sr, self.new_sr)[self.emitted - first:end - first]
        self.emitted = end
        # Keep the input the next output's window starts at; before `base` the tail would read
        # zeros, which is right only at the very start of the stream.
        keep_from = max(0, ((end // self.up) * self.down - self.reach) // self.down * self.down)
        self.tail = self.tail[keep_from - self.base:]
        self.base = keep_from
        return out
