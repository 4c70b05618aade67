"""Batched vocoding: the pushes of every stream being spoken run as one `advance_streams` call.

Each turn's vocoder thread keeps its own `StreamingVocoder` (its state is per stream); only the
push itself comes here, so the pushes that arrive while one batch runs go together in the next.
Streams whose states have the same shapes (all in steady state) share every conv call
(echox/streaming_vocoder.py); on a GPU that turns B pushes of ~100 small launches each into one.
"""

import time

import torch

from ..streaming_vocoder import Push, StreamingVocoder, advance_streams
from ..vocoder import Vocoder
from ..vocoder_graphs import SteadyPush
from .worker import BatchWorker, Request


class PushRequest(Request):
    def __init__(self, pushes: list[Push]):
        ready = None
        if pushes[0].units.is_cuda:  # the caller's stream wrote the units and a new stream's zeros
            ready = torch.cuda.Event()
            ready.record()
        super().__init__(ready)
        self.pushes = pushes


class VocoderBatcher(BatchWorker):
    def __init__(self, vocoder: Vocoder, steady: SteadyPush | None = None):
        super().__init__("echox-vocoder-batch", vocoder.dict.weight.device)
        self.vocoder, self.steady = vocoder, steady  # steady: CUDA graphs of steady streams' pushes
        self.pending: list[PushRequest] = []
        self.pushes = self.calls = self.units = 0  # pushes run, the batched calls they took, units vocoded
        self.step_seconds = 0.0  # wall time inside those calls

    def stream(self, speaker: int | None) -> StreamingVocoder:
        """A stream whose pushes run in this batch."""
        return StreamingVocoder(self.vocoder, speaker, advance=self.advance)

    def advance(self, vocoder: Vocoder, pushes: list[Push]):
        """`advance_streams` for one caller's pushes, run with whatever other pushes are waiting."""
        for _ in self.submit(PushRequest(pushes)).items():
            pass
        if self.device.type == "cuda":  # made on the batch's stream, read and freed on the caller's
            for push in pushes:
                for samples in push.samples:
                    samples.record_stream(torch.cuda.current_stream())

    def active(self) -> bool:
        return bool(self.pending)

    def admit(self, request: PushRequest) -> bool:
        self.pending.append(request)
        return True

    def step(self):
        started = time.perf_counter()
        pushes = [push for request in self.pending for push in request.pushes]
        advance_streams(self.vocoder, pushes, self.steady)
        if self.device.type == "cuda":  # the callers read the samples on their own streams
            torch.cuda.current_stream().synchronize()
        self.pushes, self.calls = self.pushes + len(pushes), self.calls + 1
        self.units += sum(push.units.shape[0] for push in pushes)
        self.step_seconds += time.perf_counter() - started
        for request in self.pending:
            request.finish()
        self.pending = []

    def fail_active(self, error: BaseException):
        for request in self.pending:
            request.finish(error)
        self.pending = []
