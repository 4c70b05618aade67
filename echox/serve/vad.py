"""Energy-based voice activity detection for `server_vad` turn detection.

The audio is cut into 20 ms frames; a frame is speech when its RMS level is above a threshold.
The API's `threshold` (0..1, default 0.5) is mapped onto a loudness, linearly in decibels:

    level_dBFS = -60 + 60 * threshold        (0.5 -> -30 dBFS, RMS 0.032 of full scale)

so a higher threshold needs louder speech, as with the API's model-based VAD. Speech starts at the
first loud frame; it stops once `silence_duration_ms` of quiet frames follow the last loud one.
Without a model this is easily fooled by steady noise: a quiet room and a close microphone are
assumed, and clients in noisy places should raise the threshold or commit by hand.
"""

import math
from dataclasses import dataclass

import torch

FRAME_MS = 20


def threshold_rms(threshold: float) -> float:
    """The frame RMS (full scale 1.0) above which a frame counts as speech."""
    return 10 ** ((-60 + 60 * threshold) / 20)


@dataclass
class VadEvent:
    kind: str  # "started" or "stopped"
    sample: int  # where speech started, or where the last loud frame ended (input samples)
    heard: int  # where the frame that decided it ends: the audio up to here is what it is about


class EnergyVad:
    """Frames in, speech start/stop events out; positions count samples from `origin` on."""

    def __init__(self, threshold: float, silence_duration_ms: int, rate: int, origin: int = 0):
        self.level = threshold_rms(threshold)
        self.frame = rate * FRAME_MS // 1000
        self.quiet_frames_to_stop = max(1, math.ceil(silence_duration_ms / FRAME_MS))
        self.partial = torch.zeros(0)
        self.position = origin  # where the next whole frame starts, in the caller's sample count
        self.speaking = False
        self.quiet_frames = 0
        self.speech_end = 0

    def push(self, samples: torch.Tensor) -> list[VadEvent]:
        events = []
        audio = torch.cat([self.partial, samples.float()])
        whole = audio.numel() // self.frame * self.frame
        frames = audio[:whole].view(-1, self.frame)
        loud = (frames.square().mean(dim=1).sqrt() > self.level).tolist()
        for is_loud in loud:
            start = self.position
            self.position += self.frame
            if is_loud:
                if not self.speaking:
                    self.speaking = True
                    events.append(VadEvent("started", start, self.position))
                self.quiet_frames, self.speech_end = 0, self.position
            elif self.speaking:
                self.quiet_frames += 1
                if self.quiet_frames >= self.quiet_frames_to_stop:
                    self.speaking = False
                    events.append(VadEvent("stopped", self.speech_end, self.position))
        self.partial = audio[whole:]
        return events
