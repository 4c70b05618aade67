"""Energy-based voice activity detection for `server_vad` turn detection.

The audio is cut into 20 ms frames; a frame is speech when its RMS level is above a threshold.
The API's `threshold` (0..1, default 0.5) is mapped onto a loudness, linearly in decibels:

    level_dBFS = -60 + 60 * threshold        (0.5 -> -30 dBFS, RMS 0.032 of full scale)

so a higher threshold needs louder speech, as with the API's model-based VAD. Speech starts once
MIN_SPEECH_MS of loud frames follow one another (dated from the first of them: a click, a cough
or a tap on the microphone is not a turn, and does not cut off an answer); it stops once
`silence_duration_ms` of quiet frames follow the last loud one.
Without a model this is easily fooled by steady noise: a quiet room and a close microphone are
assumed, and clients in noisy places should raise the threshold or commit by hand.
"""

import math
from dataclasses import dataclass

import torch

FRAME_MS = 20
MIN_SPEECH_MS = 100  # loud frames in a row before speech counts as started


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
        self.loud_frames_to_start = max(1, math.ceil(MIN_SPEECH_MS / FRAME_MS))
        self.loud_run, self.run_start = 0, 0  # loud frames in a row while not speaking, from where
        self.partial = torch.zeros(0)
        self.position = origin  # where the next whole frame starts, in the caller's sample count
        self.speaking = False
        self.quiet_frames = 0
        self.speech_end = 0

    def pending_onset(self) -> int | None:
        """While not speaking: where speech will start if the loud frames heard last go on (the
        first of them), or None after a quiet frame."""
        return self.run_start if not self.speaking and self.loud_run else None

    def push(self, samples: torch.Tensor) -> list[VadEvent]:
        events = []
        audio = torch.cat([self.partial, samples.float()])
        whole = audio.numel() // self.frame * self.frame
        frames = audio[:whole].view(-1, self.frame)
        loud = (frames.square().mean(dim=1).sqrt() > self.level).tolist()
        for is_loud in loud:
            start = self.position
            self.position += self.frame
            if not self.speaking:
                self.loud_run = self.loud_run + 1 if is_loud else 0
                if self.loud_run == 1:
                    self.run_start = start
                if self.loud_run >= self.loud_frames_to_start:
                    self.speaking, self.loud_run = True, 0
                    events.append(VadEvent("started", self.run_start, self.position))
            if self.speaking and is_loud:
                self.quiet_frames, self.speech_end = 0, self.position
            elif self.speaking:
                self.quiet_frames += 1
                if self.quiet_frames >= self.quiet_frames_to_stop:
                    self.speaking = False
                    events.append(VadEvent("stopped", self.speech_end, self.position))
        self.partial = audio[whole:]
        return events
