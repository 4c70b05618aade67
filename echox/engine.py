"""The streaming engine: load EchoX once, then hold conversations that answer in text and speech.

One turn runs as a pipeline of three threads:
  main thread   speech in -> log-mel -> Whisper -> adapter -> LLM prefill -> token by token:
                text deltas out, scores into the segmenter, each finished segment handed on;
  echo, vocoder per segment: echo decoder -> units -> streaming vocoder -> audio chunks out
                (echox/speech_pipeline.py: the two overlap each other too).
So audio for segment k is synthesised while the LLM writes segment k+1. Events come out of
`Session.respond` in the order they happen: `TextDelta`, `AudioChunk`, and a final `TurnDone`
carrying the trace (ids, frames, tokens, scores, segments, timings).
"""

import atexit
import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import SpeechAdapter, load_adapter
from .audio import speech_input
from .batch.echo_batcher import EchoBatcher
from .batch.text_batcher import TextBatcher, TextRequest
from .batch.vocoder_batcher import VocoderBatcher
from .capture import can_capture
from .checkpoint import ModelFolder, open_model_folder, resolve_vocoder, resolve_whisper
from .config import WhisperConfig
from .cpu_threads import on_every_core, on_every_core_running
from .echo import EchoDecoder, load_echo_decoder
from .errors import ConversationFull, EchoXError
from .generate import AudioSlot, Slot, TextDecoder, Token, kv_capacity
from .llama import LlamaLM, load_lm
from .mel import log_mel
from .sampling import RELEASED_SAMPLING, SamplingParams
from .segmenter import RELEASED_SEGMENTER, Segmenter, SegmenterParams
from .session_settings import SessionSettings, require_count
from .speech_pipeline import AudioChunk, SegmentRecord, SpeechPipeline, speaking
from .stop_signal import StopSignal
from .split_linear import split_one_row_products
from .streaming_vocoder import LARGEST_PIECE, StreamingVocoder, advance_streams
from .thread_limit import MAX_THREADS_PER_CORE, max_threads
from .tokenizer import Turn, user_text
from .vocoder import Vocoder, load_vocoder
from .vocoder_graphs import SteadyPush
from .whisper import WhisperEncoder, load_whisper

HUBERT_UNITS = 1000  # mHuBERT layer-11 k-means codebook (SPEC §8)
RELEASED_SPEAKER = 1
DEFAULT_MAX_LEN = 4096  # KV cache positions of one conversation
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextDelta:
    text: str


@dataclass
class TurnDone:
    text: str
    trace: dict


Event = TextDelta | AudioChunk | TurnDone
Speech = Path | str | torch.Tensor | tuple[torch.Tensor, int]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EchoXError("--device cuda was asked for, but this machine has no usable CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise EchoXError(f"device {device} is not supported (cpu or cuda)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EchoXError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Clock:
    """Wall-clock milliseconds; waits for the GPU stream first so device work is counted where it ran."""

    def __init__(self, device: torch.device):
        # Only the calling thread's stream: the LLM and the speech worker each time their own work.
        self.sync = (lambda: torch.cuda.current_stream().synchronize()) if device.type == "cuda" else (lambda: None)
        self.origin = self.now()

    def now(self) -> float:
        self.sync()
        return time.perf_counter() * 1000.0

    def since(self, start: float) -> float:
        return self.now() - start


@dataclass
class Engine:
    """Every part of EchoX, loaded once. Create conversations with `session()`.

    Without batching, sessions share the weights and the echo decoder's cache, so an engine
    answers one turn at a time; turns of different sessions may alternate freely (each session
    owns its LLM cache). With `batched(max_batch)` (load(max_batch=N)) up to N sessions answer at
    once: their LLM steps, echo-decoder steps and vocoder pushes run batched (echox/batch/)."""

    folder: ModelFolder
    lm: LlamaLM
    adapter: SpeechAdapter
    whisper: WhisperEncoder
    echo: EchoDecoder
    vocoder: Vocoder
    whisper_dir: Path
    vocoder_dir: Path
    device: torch.device
    dtype: torch.dtype

    graphs: bool = False  # decode steps (and on a GPU steady vocoder pushes) run captured (capture.py)
    steady_push: SteadyPush | None = None  # vocoder pushes of steady streams as CUDA graphs
    busy: threading.Lock = field(default_factory=threading.Lock)  # held while a turn is answered (no batching)
    # On a CPU, the torch threads of each of a turn's threads: the caller's count when the engine is made.
    threads: int = field(default_factory=torch.get_num_threads)
    # KV caches of collected unbatched sessions, with their captured steps, for the next sessions:
    # a CPU trace is never freed, so sessions must not each make new ones.
    spare_decoders: list[TextDecoder] = field(default_factory=list)
    spares_lock: threading.RLock = field(default_factory=threading.RLock)  # re-entered if a collection runs inside
    text_batcher: TextBatcher | None = None
    echo_batcher: EchoBatcher | None = None
    vocoder_batcher: VocoderBatcher | None = None

    @property
    def tokenizer(self):
        return self.folder.tokenizer

    @property
    def default_max_len(self) -> int:
        """A conversation's KV cache positions unless asked otherwise: DEFAULT_MAX_LEN, or fewer for
        a model made for fewer."""
        return min(DEFAULT_MAX_LEN, self.folder.config.llm.max_position_embeddings)

    def check_max_len(self, max_len: int):
        """KV cache positions a conversation may ask for: at most the LLM's own (its rotary embedding
        is made for no more, and a larger cache is only memory that cannot be used well)."""
        require_count(max_len=max_len)
        limit = self.folder.config.llm.max_position_embeddings
        if max_len > limit:
            raise EchoXError(f"max_len={max_len} is more positions than this model has ({limit}, "
                             f"max_position_embeddings in its config.json)")

    @property
    def speaker(self) -> int | None:
        """The released inference speaks with speaker 1 when the vocoder has several voices."""
        return RELEASED_SPEAKER if self.vocoder.cfg.num_speakers else None

    def prepare(self, graphs: bool) -> "Engine":
        """Decide on captured steps (capture.py) and capture now, before any turn starts threads:
        the echo decoder's step (its cache never moves, so one capture serves every segment of
        every session) and, on a GPU, a stream's vocoder push for every frame bucket
        (vocoder_graphs.py). On a CPU vocoder pushes stay eager: their convs are long ops, so a
        trace saves little, and tracing one (a second each, per push length and stream count)
        would stall the first pushes of every length."""
        self.graphs = graphs and can_capture(self.device)
        if self.device.type == "cpu":  # before the capture: its steps then run the split products
            split_one_row_products(self.echo.body)
        self.echo.use_graphs = self.graphs
        if self.graphs:
            self.echo.block_function(full_head=False)
        if self.graphs and self.device.type == "cuda":
            self.steady_push = SteadyPush(self.vocoder, capture=True)
            self.steady_push.capture_buckets(LARGEST_PIECE)
        return self

    def batched(self, max_batch: int, max_len: int | None = None) -> "Engine":
        """Answer up to `max_batch` turns at once, each conversation in a KV slot of `max_len`
        positions (default: `default_max_len`; memory: max_batch x max_len positions of every LLM
        layer, allocated now)."""
        require_count(max_batch=max_batch)
        max_len = self.default_max_len if max_len is None else max_len
        self.check_max_len(max_len)
        if self.text_batcher is not None:
            raise EchoXError("this engine is batched already (its batch size is fixed once turned on)")
        tok = self.tokenizer
        self.echo_batcher = EchoBatcher(self.echo, max_batch, self.graphs)
        if self.steady_push is not None:  # captured vocoder pushes for up to max_batch streams at once
            self.steady_push.use_widths(max_batch)
        self.vocoder_batcher = VocoderBatcher(self.vocoder, self.steady_push)
        self.text_batcher = TextBatcher(self.lm, tok.pad, tok.eot, tok.period, max_batch, max_len, self.graphs,
                                        speech_busy=lambda: self.echo_batcher.active() or self.vocoder_batcher.active())
        for batcher in (self.text_batcher, self.echo_batcher, self.vocoder_batcher):
            batcher.start()
        return self

    def voice(self) -> StreamingVocoder:
        """A vocoder stream for one turn's speech, its pushes batched with other turns' if batching."""
        if self.vocoder_batcher is not None:
            return self.vocoder_batcher.stream(self.speaker)
        return StreamingVocoder(self.vocoder, self.speaker, advance=functools.partial(advance_streams,
                                                                                       steady=self.steady_push))

    @property
    def max_batch(self) -> int:
        """How many turns this engine answers at once."""
        return 1 if self.text_batcher is None else len(self.text_batcher.table)

    def echo_units(self, segment: torch.Tensor, max_units: int, ready=None,
                   on_stop: Callable[[Callable[[], None]], None] | None = None) -> Iterator[int]:
        """The unit tokens of one segment [n, H], from the echo decoder or its batch. `on_stop`
        takes what wakes a wait for the batch and drops the segment (the caller's stop)."""
        if self.echo_batcher is not None:
            return self.echo_batcher.generate(segment, max_units, ready, on_stop)
        return self.echo.generate(segment, max_units=max_units)

    def session(self, **options) -> "Session":
        return Session(self, **options)

    def text_decoder(self, max_len: int) -> TextDecoder:
        """An unbatched session's KV cache for `max_len` positions: a spare one of the same capacity
        (generate.kv_capacity) or a new one (the session's `reset` empties it and zeroes its
        sampling counter)."""
        with self.spares_lock:
            for i, decoder in enumerate(self.spare_decoders):
                if kv_capacity(decoder.max_len) == kv_capacity(max_len):
                    del self.spare_decoders[i]
                    decoder.max_len = max_len
                    return decoder
        tok = self.tokenizer
        return TextDecoder(self.lm, tok.pad, tok.eot, tok.period, max_len, use_graphs=self.graphs)

    def spare(self, decoder: TextDecoder):
        """Keep the KV cache of a collected session for the next one."""
        with self.spares_lock:
            self.spare_decoders.append(decoder)


def load(model_dir: Path | str, whisper: Path | str | None = None, vocoder: Path | str | None = None,
         device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         graphs: bool = True, threads: int | None = None, max_batch: int | None = None) -> Engine:
    """Load an EchoX model folder, its Whisper encoder and its vocoder onto `device`.

    The LLM and echo-decoder decode steps (and on a GPU steady vocoder pushes) run captured
    (capture.py: CUDA graphs on a GPU, TorchScript traces on a CPU) unless `graphs` is False
    (for debugging: eager steps show each op in a profiler and raise where they fail; the results
    are the same).
    `threads` sets torch's intra-op CPU threads, which the LLM, echo-decoder and vocoder threads
    of a turn each start with (None: leave torch's setting); an unbatched turn's speech encoder,
    adapter and prefill, which run before those threads start, use every core, as does a batched
    prefill while no speech is being made (cpu_threads.py).
    `max_batch` turns the engine into a batched one (`Engine.batched`)."""
    if threads is not None:
        require_count(threads=threads)
        if threads > max_threads():
            raise EchoXError(f"threads must be at most {max_threads()} ({MAX_THREADS_PER_CORE} per core; thousands "
                             f"fail to start in OpenMP), got {threads}")
        torch.set_num_threads(threads)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = open_model_folder(model_dir)
    cfg, weights = folder.config, folder.weights
    whisper_dir, vocoder_dir = resolve_whisper(folder, whisper), resolve_vocoder(folder, vocoder)
    whisper_width = WhisperConfig.from_dir(whisper_dir).d_model  # checked before gigabytes are read
    if whisper_width != cfg.adapter.encoder_dim:
        raise EchoXError(f"{whisper_dir}: this Whisper encoder has width {whisper_width}, but the "
                         f"model's adapter expects {cfg.adapter.encoder_dim}: wrong --whisper folder?")
    voice = load_vocoder(vocoder_dir, torch.float32, device)  # fp32: it is small and its output is audio
    if voice.cfg.num_embeddings < HUBERT_UNITS:
        raise EchoXError(f"{vocoder_dir}: this vocoder knows {voice.cfg.num_embeddings} units, but EchoX speaks "
                         f"HuBERT units 0..{HUBERT_UNITS - 1}: wrong --vocoder folder?")
    engine = Engine(folder, load_lm(weights, cfg.llm, dtype, device), load_adapter(weights, cfg.adapter, dtype, device),
                    load_whisper(whisper_dir, dtype, device).eval(), load_echo_decoder(folder, dtype, device), voice,
                    whisper_dir, vocoder_dir, device, dtype).prepare(graphs)
    return engine if max_batch is None else engine.batched(max_batch)

class Session(SessionSettings):
    """One conversation: its turns, its speech embeddings and the LLM's KV cache across turns."""

    def __init__(self, engine: Engine, sampling: SamplingParams = RELEASED_SAMPLING,
                 segmenter: SegmenterParams = RELEASED_SEGMENTER, max_new_tokens: int = 512,
                 max_units: int = 2048, max_len: int | None = None, push_units: int = 32, speak: bool = True):
        """`max_len`: positions of this conversation's KV cache (default 4096, or the model's fewer); a batched engine's
        sessions use its slots instead, whose size is set when batching is turned on.
        `speak` False answers in text only: no echo decoder or vocoder work, no AudioChunk. Every
        setting but `max_len` may change between turns; each is checked when set (session_settings.py)."""
        if max_len is not None:
            engine.check_max_len(max_len)
        self.engine, self.sampling, self.segmenter, self.speak = engine, sampling, segmenter, speak
        self.max_new_tokens, self.max_units, self.push_units = max_new_tokens, max_units, push_units
        self.decoder: TextDecoder | None = None  # this conversation's own KV cache, without batching
        if engine.text_batcher is None:
            self.decoder = engine.text_decoder(engine.default_max_len if max_len is None else max_len)
            weakref.finalize(self, engine.spare, self.decoder)
            self.decoder.step_function(sampling)  # capture the step now, not inside the first answer
        elif max_len not in (None, engine.text_batcher.max_len):
            raise EchoXError(f"this engine batches conversations in KV slots of {engine.text_batcher.max_len} "
                             f"positions; a session cannot ask for max_len={max_len}")
        else:  # the sampling counter, which an unbatched session's decoder keeps
            self.counter = torch.zeros(1, dtype=torch.int64, device=engine.device)
        self.stop_turn: StopSignal | None = None  # the turn in progress's own stop, for cancel()
        self.turn_steps: Iterator | None = None  # its generator of events, once it runs
        self.turn_lock = threading.Lock()  # held while it is, so two threads cannot both start one
        self.speech_inputs = 0  # speech inputs taken so far, over the session's life (AudioSlot.speech)
        self.reset()

    def reset(self):
        """Forget the conversation; the KV cache buffers and captured graphs are kept for reuse.
        Not while a turn is in progress: it would write its answer into the new conversation."""
        if not self.turn_lock.acquire(blocking=False):  # held from a turn's start to its TurnDone
            raise EchoXError("this session is answering a turn: let it reach its TurnDone (cancel() brings it soon) "
                             "before a reset")
        try:
            self.turns: list[Turn] = []
            self.speech: dict[int, torch.Tensor] = {}  # speech input number -> its embeddings [v, H], in turn order
            if self.decoder is not None:
                self.decoder.cached = []
            else:
                self.engine.text_batcher.forget(self)
            with torch.inference_mode():  # the counter may be an inference tensor (a session made in that mode)
                self.sampling_counter().zero_()  # a seeded session then samples as a new one would
        finally:
            self.turn_lock.release()

    def cancel(self):
        """Stop this session's turn in progress, from any thread (e.g. a voice detector barging in).

        The turn ends within one LLM step or one vocoder push: `respond` then yields the rest of
        the text already decoded and a `TurnDone` whose trace has "cancelled": True. The history
        keeps the question and, as the assistant's turn, the text yielded. Without a turn in
        progress this does nothing."""
        if (stop := self.stop_turn) is not None:
            stop.set()

    def listen(self, samples: torch.Tensor, clock: Clock, timings: dict) -> tuple[torch.Tensor, list]:
        """16 kHz samples [N] -> (embeddings [v, H], kept frame indices): mel, Whisper, adapter (SPEC §2-4)."""
        engine = self.engine
        started = clock.now()
        mel = log_mel(samples.to(engine.device, torch.float32), engine.whisper.cfg.num_mel_bins).to(engine.dtype)
        frames = engine.whisper(mel)[0]  # [1500, d]
        timings["encoder"] = clock.since(started)
        started = clock.now()
        embeddings, kept = engine.adapter(frames)
        timings["adapter"] = clock.since(started)
        return embeddings, kept.tolist()

    def slots(self) -> list[Slot]:
        """The whole conversation as prompt slots, each <audio_patch> expanded into its speech rows."""
        tok = self.engine.tokenizer
        speech_inputs = iter(sorted(self.speech))
        slots: list[Slot] = []
        for token in tok.prompt(self.turns):
            if token != tok.audio_patch:
                slots.append(token)
                continue
            speech = next(speech_inputs, None)
            if speech is None:
                raise EchoXError("the text of a turn contains '<audio_patch>', which is reserved for speech")
            slots.extend(AudioSlot(speech, row) for row in range(self.speech[speech].shape[0]))
        return slots

    def respond(self, audio: Speech | None = None, text: str | None = None) -> Iterator[Event]:
        """Answer one user turn (speech, text, or both), streaming text and audio as they exist.

        `audio` is a sound file's path, 16 kHz samples, or a (samples, sample rate) pair, as
        `echox.audio.speech_input` takes them: stereo is downmixed, other rates resampled, more
        than 30 s cut with a warning, and anything unusable refused before any model work.
        A turn that fails, or that the caller abandons before its `TurnDone`, leaves the
        conversation as it was; once `TurnDone` is out the turn is part of the history, whether
        or not the caller reads on."""
        text = user_text(text)  # checked, with the speech, before any model work
        if audio is None and not text:
            raise EchoXError("a turn needs speech (audio=...) or text (text=...)")
        stop, release = self._take_turn()  # from here a cancel reaches this turn, even while its speech is read
        before = (len(self.turns), dict(self.speech), self.sampling_counter().clone())
        events = self.turn_steps = self._respond(audio, text, stop)  # whether it runs (gi_running): the exit hook
        ANSWERING.add(self)
        finished = False
        try:
            while True:
                with torch.inference_mode():  # for each step only: the caller's code between events (another
                    event = next(events, None)  # turn's steps, say) keeps its own mode
                if event is None:
                    break
                if finished := isinstance(event, TurnDone):  # the turn is history now, whether or not the
                    release()  # caller reads on (it may hold this generator and start the next turn)
                yield event
        finally:
            with torch.inference_mode():
                events.close()  # a batched turn's closing moves the sampling counter: restored after it
                if not finished:  # failed or abandoned: the conversation as it was
                    turns, self.speech, counter = before
                    del self.turns[turns:]
                    self.sampling_counter().copy_(counter)
            release()

    def _take_turn(self) -> tuple[StopSignal, Callable[[], None]]:
        """Take this session (and an unbatched engine) for a turn; returns the turn's stop signal and
        the function that lets go of them, once (at TurnDone, or when the turn ends otherwise)."""
        solo = self.decoder is not None  # batched turns need no engine lock: each is a row of the batch
        if solo and self.engine.text_batcher is not None:  # its steps would race the batch's on shared layers
            raise EchoXError("this session was created before its engine was batched: start a new session")
        if not self.turn_lock.acquire(blocking=False):
            raise EchoXError("this session is answering a turn already: finish (or close) that one first")
        if solo and not self.engine.busy.acquire(blocking=False):
            self.turn_lock.release()
            raise EchoXError("this engine is answering another turn: finish (or close) that one first")
        stop = self.stop_turn = StopSignal()
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                if self.stop_turn is stop:  # a cancel no longer reaches this turn
                    self.stop_turn = None
                if solo:
                    self.engine.busy.release()
                self.turn_lock.release()
        return stop, release

    def sampling_counter(self) -> torch.Tensor:
        """The counter a seeded session's draws follow: its decoder's, or its own on a batched engine."""
        return self.decoder.step if self.decoder is not None else self.counter

    def llm_tokens(self, slots: list[Slot], clock: Clock, timings: dict, stop: StopSignal):
        """(the answer's tokens, a function that adds the prefill's timings once they are out and
        returns how much of the token loop's wall time they took). Without batching the prefill
        runs here; with it, the turn waits for a KV slot and is prefilled by the batch (a stop
        wakes it at once, wherever it waits)."""
        if self.decoder is not None:
            started = clock.now()
            hidden = self.decoder.prefill(slots, self.speech)
            timings["prefill"] = clock.since(started)
            return self.decoder.decode(hidden, len(slots), self.sampling, self.max_new_tokens), lambda _: 0.0
        # The turn samples on a counter of its own: a row that was left may step on until the batch
        # sees it go, and those steps must not move the session's.
        counter = self.counter.clone()
        ready = None
        if self.engine.device.type == "cuda":  # the speech embeddings and the counter are written on this stream
            ready = torch.cuda.Event()
            ready.record()
        request = TextRequest(self, slots, self.speech, self.sampling, self.max_new_tokens, counter, ready)
        stop.on_set(request.withdraw)

        def answer() -> Iterator[Token]:
            taken, full = 0, False
            try:
                for token in self.engine.text_batcher.answer(request):
                    yield token
                    taken += 1  # the turn came back for the next one
            except ConversationFull:
                full = True
                raise
            finally:
                # The session's counter moves on as an unbatched turn's does, however the turn ended:
                # that one chose a token past the last it handed out (eot, or the one a stop dropped)
                # and queued the step after it, within its token limit; at the end of its KV cache
                # it queued no step past the end.
                self.counter += taken if full else min(taken + 2, self.max_new_tokens)

        def finish(timings: dict) -> float:
            timings |= {"kv_slot_wait": request.wait_ms, "prefill": request.prefill_ms}
            return request.wait_ms + request.prefill_ms
        return answer(), finish

    def _respond(self, audio: Speech | None, text: str, stop: StopSignal) -> Iterator[Event]:
        # The speech is read in the turn's first step, so that the exit hook sees it (its resampling
        # is torch ops, which a thread must not be inside as the interpreter ends).
        samples = None if audio is None else speech_input(audio)
        engine, tok = self.engine, self.engine.tokenizer
        clock, timings = Clock(engine.device), {}

        def before_llm() -> tuple[list[int], list[Slot], Iterator, Callable]:
            kept: list[int] = []
            if samples is not None:
                embeddings, kept = self.listen(samples, clock, timings)
                self.speech[self.speech_inputs] = embeddings
                self.speech_inputs += 1
            self.turns.append(Turn("user", text, audio=samples is not None))
            slots = self.slots()
            return kept, slots, *self.llm_tokens(slots, clock, timings, stop)

        # Until the LLM's first step a solo turn has the CPU to itself; a batched one shares it.
        alone = self.decoder is not None and engine.device.type == "cpu"
        kept, slots, answer_tokens, finish_timings = on_every_core(before_llm) if alone else before_llm()

        speech = SpeechPipeline(engine, self.max_units, self.push_units, clock, speak=self.speak)
        stop.on_set(speech.stop)
        segmenter, text_stream = Segmenter(self.segmenter), tok.decode_stream()
        tokens, hiddens, scores, shown = [], [], [], ""
        started = clock.now()
        try:
            with contextlib.closing(answer_tokens):  # left at a stop: the batch drops the row at once
                for token in answer_tokens:
                    if stop.is_set():
                        break
                    tokens.append(token.id)
                    hiddens.append(token.hidden)
                    scores.append(token.score)
                    if delta := text_stream.step(token.id):  # None inside a multi-byte character
                        shown += delta
                        yield TextDelta(delta)
                    if (cut := segmenter.push(token.score)) is not None:
                        speech.submit(SegmentRecord(*cut), hiddens[cut[0]:cut[1]])
                    yield from speech.chunks(wait=False)
            decode_ms = clock.since(started)
            answer = tok.decode(tokens)
            if answer != shown:  # it ended inside a multi-byte character: say so now, not after the speech
                yield TextDelta(answer[len(shown):])
            if (cut := segmenter.finish()) is not None and not stop.is_set():
                speech.submit(SegmentRecord(*cut), hiddens[cut[0]:cut[1]])
            speech.close()
            yield from speech.chunks(wait=True)
        except BaseException:  # an error, or the caller stopped listening: stop speaking too
            speech.stop()
            speech.join()
            raise
        speech.join()
        self.turns.append(Turn("assistant", answer))
        decode_ms -= finish_timings(timings)
        timings |= {"decode_per_token": decode_ms / max(len(tokens), 1), "echo_decoder": speech.echo_ms,
                    "vocoder": speech.vocoder_ms, "time_to_first_audio": speech.first_audio_ms,
                    "vocoder_start": speech.vocoder_start_ms, "vocoder_end": speech.vocoder_end_ms,
                    "total": clock.since(clock.origin)}
        trace = {
            "prompt_ids": [s if isinstance(s, int) else tok.audio_patch for s in slots],
            "speech_frames": kept,
            "tokens": tokens,
            "text": answer,
            "scores": scores,
            "segments": [record.as_dict() for record in speech.records],
            "timings_ms": timings,
            "cancelled": stop.is_set(),
        }
        yield TurnDone(answer, trace)


ANSWERING: "weakref.WeakSet[Session]" = weakref.WeakSet()  # sessions that started a turn (maybe ended)


@atexit.register
def stop_turns_at_exit(seconds: float = 10.0):
    """Stop the turns still in progress (in daemon threads, say a server's) before the interpreter
    ends, and give them up to `seconds` to get out of their torch ops: a thread still inside one then
    would abort the process as it returns ("terminate called without an active exception", exit
    code 134). A turn whose caller has stopped reading (its steps suspended) holds nothing up. Speech
    and every-core threads are waited for even when their turn has let go of its session: a second
    Ctrl-C can cut short the turn's own wait for them (its stop was already set).
    (Registered after the batch loops' own stop, so it runs before it.)"""
    sessions = list(ANSWERING)
    for session in sessions:
        if (stop := session.stop_turn) is not None:
            stop.set()

    def stepping(session: Session) -> bool:
        steps = session.turn_steps
        return session.stop_turn is not None and steps is not None and steps.gi_running
    deadline = time.monotonic() + seconds
    while (speaking() or on_every_core_running() or any(stepping(session) for session in sessions)) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
