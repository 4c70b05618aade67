"""The speech half of a turn: segments of LLM hidden states in, audio chunks out, in two threads.

  echo thread     per segment: echo decoder -> unit tokens -> HuBERT units, handed on as they come;
  vocoder thread  per segment: units -> streaming vocoder pushes -> audio chunks, then a flush.
So the echo decoder writes the units of segment k (or of the rest of segment k) while the
vocoder speaks what it has already written, and both run while the LLM writes segment k+1.
On a GPU each thread has its own CUDA stream; on a CPU each runs torch ops with the engine's
intra-op thread count, except that the echo decoder takes every core while the vocoder waits
for units (its one-row products then split over them, split_linear.py, with the same bits).

The vocoder's pushes do not depend on timing: the first push of a segment waits for
`lookahead_units` + 1 units (no sample can leave the vocoder before that), every later one
for `push_units`, and the flush takes the rest (with the segment's end, in one call). So the chunks, and every sample, are the same
however the threads interleave. Chunks come out in segment order, each tagged with its segment.

Smaller pushes right after the first would bring the second chunk sooner, but on a CPU every
push costs ~40 ms whatever its size at the released vocoder shape (short convs run far below a
core's peak, and each push concatenates caches and activates inputs once more): a 4, 8, 16-unit
ramp cut the silence after the first chunk from ~450 to ~150 ms and cost 15% more vocoder time
(1.27x instead of 1.11x the offline vocoder, 2026-12-01), so it is not done.
"""

import contextlib
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .cpu_threads import pin_threads, usable_cores
from .stop_signal import StopSignal

END_OF_SEGMENT = None  # in the unit queue: the segment's units are all written


@dataclass
class SegmentRecord:
    start: int
    end: int
    unit_tokens: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    samples: int = 0

    def as_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "unit_tokens": self.unit_tokens, "units": self.units,
                "samples": self.samples}


@dataclass
class AudioChunk:
    samples: torch.Tensor  # [n] float32 on the CPU, 16 kHz
    segment: int


class SpeechPipeline:
    """Speaks the segments `submit`ted to it; `chunks` hands out the audio as it is made. One that
    does not `speak` (a text-only turn) starts no thread, keeps no segment and ends at once."""

    def __init__(self, engine, max_units: int, push_units: int, clock, speak: bool = True):
        self.engine, self.max_units, self.push_units, self.clock = engine, max_units, push_units, clock
        self.speaks = speak
        self.out: queue.Queue = queue.Queue()  # AudioChunk, then None once the vocoder thread ends
        self.ended = False  # that None has been read
        self.segments: queue.Queue = queue.Queue()  # (index, hidden [n, H], ready event) or None
        self.units: queue.Queue = queue.Queue()  # (index, [units]) or (index, END_OF_SEGMENT) or None
        self.records: list[SegmentRecord] = []
        self.echo_ms = self.vocoder_ms = 0.0
        self.first_audio_ms: float | None = None
        # The vocoder's first push began and its last one ended (ms into the turn): before the first,
        # the turn waits for a segment and its first units; between them, vocoder_ms is busy.
        self.vocoder_start_ms: float | None = None
        self.vocoder_end_ms: float | None = None
        self.errors: list[BaseException] = []
        self.stopped = StopSignal()  # also wakes the echo thread if it waits for a slot of the echo batch
        self.vocoding = False  # the vocoder thread is inside a push (else it waits for units)
        # Each thread, however it ends, tells the next stage that nothing more comes from it.
        self.threads = [threading.Thread(target=self._guarded, args=(loop, done), name=name, daemon=True)
                        for name, loop, done in (("echox-echo", self._echo_loop, self.units),
                                                 ("echox-vocoder", self._vocoder_loop, self.out))] if speak else []
        for thread in self.threads:
            thread.start()
        if not speak:
            self.out.put(None)  # its end: no audio comes
        PIPELINES.add(self)

    def submit(self, record: SegmentRecord, hiddens: list[torch.Tensor]):
        """Queue a segment: its tokens' hidden states, [H] each. On a GPU they are still being
        written on the LLM's stream: an event marks where, and the echo stream waits for it before
        reading."""
        if not self.speaks:
            return
        hidden = torch.stack(hiddens)  # [n, H]
        ready = None
        if hidden.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self.records.append(record)
        self.segments.put((len(self.records) - 1, hidden, ready))

    def close(self):
        """No more segments: finish the queued ones, then stop."""
        self.segments.put(None)

    def stop(self):
        """Drop what is queued and stop both threads at their next unit or push; do not wait."""
        self.stopped.set()
        self.segments.put(None)
        self.units.put(None)

    def join(self):
        for thread in self.threads:
            thread.join()

    def chunks(self, wait: bool) -> Iterator[AudioChunk]:
        """The audio chunks made so far; with `wait`, every chunk until the pipeline ends. An error
        in either thread is raised here, once the pipeline has stopped."""
        while not self.ended:
            try:
                item = self.out.get(block=wait)
            except queue.Empty:
                return
            if item is None:
                self.ended = True
            else:
                yield item
        if self.errors:
            raise self.errors[0]

    def _guarded(self, loop, done: queue.Queue):
        """Run one thread's loop on its own stream, then put None on `done`. An error stops the
        whole pipeline and is kept for the main thread, which re-raises it."""
        device = self.engine.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if device.type == "cpu":
            pin_threads(self.engine.threads)
        try:
            with torch.inference_mode(), (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
                loop()
        except BaseException as e:
            self.errors.append(e)
            self.stop()
        finally:
            done.put(None)

    # ---- echo thread --------------------------------------------------------------------------

    def _echo_loop(self):
        while (job := self.segments.get()) is not None and not self.stopped.is_set():
            self._echo_segment(*job)

    def _echo_segment(self, index: int, hidden: torch.Tensor, ready):
        if ready is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(ready)
            hidden.record_stream(stream)  # its memory is not reused before this stream is done with it
        echo, record = self.engine.echo, self.records[index]
        started = self.clock.now()
        with self._echo_threads() as threads:
            threads()
            for unit_token in self.engine.echo_units(hidden, self.max_units, ready, self.stopped.on_set):
                if self.stopped.is_set():
                    return
                units = echo.units_of([unit_token])
                record.unit_tokens.append(unit_token)
                record.units.extend(units)
                if units:
                    self.units.put((index, units))
                threads()  # for the next step
        self.echo_ms += self.clock.since(started)
        self.units.put((index, END_OF_SEGMENT))

    @contextlib.contextmanager
    def _echo_threads(self):
        """A function that sets this thread's torch threads for the echo decoder's next step: every
        core while the vocoder waits for units, the engine's count while it pushes (and after the
        segment). On a CPU the decode step's products then read their weights on every core
        (split_linear.py), with the same bits on any count; a GPU and the echo batch of a batched
        engine keep theirs."""
        own, cores = self.engine.threads, usable_cores()
        if self.engine.device.type != "cpu" or self.engine.echo_batcher is not None or own >= cores:
            yield lambda: None
            return

        def choose():
            wanted = own if self.vocoding else cores
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
        try:
            yield choose
        finally:
            torch.set_num_threads(own)

    # ---- vocoder thread -----------------------------------------------------------------------

    def _vocoder_loop(self):
        voice = self.engine.voice()
        waiting: list[int] = []
        batch = voice.lookahead_units + 1
        while (item := self.units.get()) is not None and not self.stopped.is_set():
            index, units = item
            if units is END_OF_SEGMENT:
                self._vocode(index, voice.flush, torch.tensor(waiting, dtype=torch.int64))
                waiting, batch = [], voice.lookahead_units + 1
                continue
            waiting.extend(units)
            if len(waiting) >= batch:
                self._vocode(index, voice.push, torch.tensor(waiting))
                waiting, batch = [], self.push_units

    def _vocode(self, index: int, step, *args):
        started = self.clock.now()
        if self.vocoder_start_ms is None:
            self.vocoder_start_ms = started - self.clock.origin
        self.vocoding = True
        try:
            samples = step(*args)
        finally:
            self.vocoding = False
        ended = self.clock.now()
        self.vocoder_ms += ended - started
        self.vocoder_end_ms = ended - self.clock.origin
        if samples.numel() == 0:
            return
        self.records[index].samples += samples.numel()
        if self.first_audio_ms is None:
            self.first_audio_ms = self.clock.since(self.clock.origin)
        self.out.put(AudioChunk(samples.float().cpu(), index))


PIPELINES: "weakref.WeakSet[SpeechPipeline]" = weakref.WeakSet()


def speaking() -> bool:
    """Whether a thread of any turn's speech is still alive."""
    return any(thread.is_alive() for pipeline in list(PIPELINES) for thread in pipeline.threads)
