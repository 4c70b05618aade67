"""The end-to-end engine on the tiny checkpoint: determinism, exact streaming, a complete trace."""

import contextlib
import functools
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import echox.cpu_threads as cpu_threads
import echox.engine as echox_engine
from echox.cli import demo_question
from echox.cpu_threads import every_core, torch_threads, usable_cores
from echox.engine import AudioChunk, TextDelta, TurnDone
from echox.errors import EchoXError
from echox.sampling import GREEDY, SamplingParams
from echox.segmenter import SegmenterParams, segment_all
from echox.speech_pipeline import SpeechPipeline

# Short thresholds so that a 40-token answer has several segments.
SHORT = SegmenterParams(min_len=12, min_len_confident=6)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return echox_engine.load(tiny_model_dir)


def run_turn(session, **turn):
    events = list(session.respond(**turn))
    assert isinstance(events[-1], TurnDone)
    return events, events[-1].trace


def new_session(engine, **options):
    # Small vocoder pushes after the first, so a segment streams in several chunks.
    defaults = {"sampling": GREEDY, "segmenter": SHORT, "max_new_tokens": 40, "max_units": 40, "push_units": 4}
    return engine.session(**(defaults | options))


def test_greedy_turn_is_deterministic(engine):
    _, first = run_turn(new_session(engine), audio=demo_question(2.0))
    _, second = run_turn(new_session(engine), audio=demo_question(2.0))
    del first["timings_ms"], second["timings_ms"]
    assert first == second


def test_trace_is_complete_and_consistent(engine):
    tok = engine.tokenizer
    events, trace = run_turn(new_session(engine), audio=demo_question(2.0), text="Please answer.")
    assert set(trace) >= {"prompt_ids", "speech_frames", "tokens", "text", "scores", "segments", "timings_ms"}
    frames = trace["speech_frames"]
    assert frames[0] == 0 and frames == sorted(frames) and frames[-1] < 750
    assert trace["prompt_ids"].count(tok.audio_patch) == len(frames)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == trace["text"] == tok.decode(trace["tokens"])
    assert len(trace["scores"]) == len(trace["tokens"]) == 40
    bounds = [(s["start"], s["end"]) for s in trace["segments"]]
    assert bounds == segment_all(trace["scores"], SHORT) and len(bounds) > 1
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    for index, segment in enumerate(trace["segments"]):
        assert len(segment["unit_tokens"]) <= 40
        assert segment["units"] == engine.echo.units_of(segment["unit_tokens"])
        frames_out = int(engine.vocoder.durations(torch.tensor(segment["units"])).sum()) if segment["units"] else 0
        assert segment["samples"] == 320 * frames_out
        assert sum(c.samples.numel() for c in chunks if c.segment == index) == segment["samples"]
    timings = trace["timings_ms"]
    assert all(timings[k] >= 0 for k in ("encoder", "adapter", "prefill", "decode_per_token", "echo_decoder",
                                         "vocoder", "total"))


def test_streamed_audio_equals_offline_vocoding_of_each_segment(engine):
    events, trace = run_turn(new_session(engine), audio=demo_question(2.0))
    assert max(sum(isinstance(e, AudioChunk) and e.segment == i for e in events)
               for i in range(len(trace["segments"]))) > 1  # some segment really streamed in pieces
    for index, segment in enumerate(trace["segments"]):
        streamed = [e.samples for e in events if isinstance(e, AudioChunk) and e.segment == index]
        if not segment["units"]:
            assert not streamed
            continue
        offline = engine.vocoder(torch.tensor(segment["units"]))
        torch.testing.assert_close(torch.cat(streamed), offline, atol=1e-5, rtol=0)


def test_text_only_and_multi_turn(engine):
    session = new_session(engine, max_new_tokens=12)
    _, first = run_turn(session, text="Hello there.")
    assert first["speech_frames"] == [] and engine.tokenizer.audio_patch not in first["prompt_ids"]
    _, second = run_turn(session, audio=demo_question(1.0))
    _, third = run_turn(session, text="Thanks.")
    assert len(session.turns) == 6
    # The third prompt holds the whole history, so it starts with the second prompt.
    assert third["prompt_ids"][:len(second["prompt_ids"])] == second["prompt_ids"]
    # Reusing the KV cache across turns gives what a fresh conversation with that history gives.
    fresh = new_session(engine, max_new_tokens=12)
    fresh.turns, fresh.speech = session.turns[:4], dict(session.speech)
    _, replay = run_turn(fresh, text="Thanks.")
    assert replay["tokens"] == third["tokens"]


def test_a_session_that_does_not_speak_writes_the_same_answer_and_makes_no_speech(engine, monkeypatch):
    """speak=False (a text-only response): the same tokens and text, no audio, no segments, and the
    echo decoder and vocoder never run; the next turn of the same session may speak again."""
    _, spoken = run_turn(new_session(engine), audio=demo_question(2.0))
    monkeypatch.setattr(engine, "echo_units", lambda *a, **k: pytest.fail("the echo decoder ran"))
    quiet = new_session(engine, speak=False)
    events, trace = run_turn(quiet, audio=demo_question(2.0))
    assert not any(isinstance(e, AudioChunk) for e in events)
    assert trace["tokens"] == spoken["tokens"] and trace["text"] == spoken["text"] and spoken["segments"]
    assert trace["segments"] == [] and trace["timings_ms"]["echo_decoder"] == trace["timings_ms"]["vocoder"] == 0
    monkeypatch.undo()
    quiet.speak = True
    events, _ = run_turn(quiet, text="And now aloud.")
    assert any(isinstance(e, AudioChunk) for e in events)


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_speak_must_be_a_bool(engine, value):
    with pytest.raises(EchoXError, match="speak must be True or False"):
        engine.session(speak=value)
    session = engine.session()
    with pytest.raises(EchoXError, match="speak must be True or False"):
        session.speak = value  # as the README shows it set between turns
    assert session.speak is True


def test_seeded_sampling_reproducible(engine):
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    runs = [run_turn(new_session(engine, sampling=sampling, max_new_tokens=10), text="Hi")[1]["tokens"]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_turn_needs_speech_or_text(engine):
    with pytest.raises(EchoXError, match="needs speech"):
        list(new_session(engine).respond())


@pytest.mark.parametrize("limit, value", [(limit, value) for limit in ("max_new_tokens", "max_units", "push_units",
                                                                        "max_len")
                                          for value in (0, -5, 2.5, None, True)
                                          if (limit, value) != ("max_len", None)])  # None: the default max_len
def test_session_limits_that_are_not_whole_numbers_are_refused(engine, limit, value):
    """2.5 units was never reached (the echo decoder spoke until its cache ran out); max_len=0 became
    4096, the others ended in TypeErrors from deep inside."""
    with pytest.raises(EchoXError, match=f"{limit} must be a whole number >= 1"):
        engine.session(**{limit: value})


@pytest.mark.parametrize("name, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be a whole number >= 1, got 0"),  # was an empty answer, kept
    ("max_units", "7", "max_units must be a whole number >= 1, got '7'"),  # was a TypeError inside the turn
    ("push_units", 2.5, "push_units must be a whole number >= 1"),
    ("sampling", None, "sampling must be a SamplingParams (echox.sampling), got None"),  # was an AttributeError
    ("segmenter", "released", "segmenter must be a SegmenterParams (echox.segmenter), got 'released'")])
def test_settings_changed_between_turns_are_checked_when_set(engine, name, value, message):
    session = new_session(engine, max_new_tokens=3)
    before = getattr(session, name)
    with pytest.raises(EchoXError, match=re.escape(message)):
        setattr(session, name, value)
    assert getattr(session, name) == before  # the session keeps what it had, and still answers
    assert len(run_turn(session, text="Hi.")[1]["tokens"]) <= 3
    with pytest.raises(EchoXError, match=re.escape(message.split(", got")[0])):
        engine.session(**{name: value})  # and a new session refuses it at once, not at its first turn


def test_a_kv_cache_longer_than_the_model_is_refused(engine):
    """max_len=2**40 ended in the allocator's RuntimeError; past max_position_embeddings the rotary
    embedding was never made for the positions anyway."""
    limit = engine.folder.config.llm.max_position_embeddings
    with pytest.raises(EchoXError, match=f"max_len={limit + 1} is more positions than this model has \\({limit},"):
        engine.session(max_len=limit + 1)
    with pytest.raises(EchoXError, match="max_len=1099511627776 is more positions"):
        engine.batched(2, max_len=2 ** 40)
    assert engine.session(max_len=limit).decoder.max_len == limit


def test_a_model_made_for_fewer_positions_gets_caches_of_its_size(tiny_root, tmp_path):
    """The default of 4096 positions was refused (batched, --max-batch) or unchecked (a session) for a
    model made for fewer."""
    import json
    import shutil
    shutil.copytree(tiny_root, tmp_path / "root")
    config = tmp_path / "root" / "EchoX-tiny" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"max_position_embeddings": 2048}))
    short = echox_engine.load(tmp_path / "root" / "EchoX-tiny")
    assert short.session().decoder.max_len == 2048
    assert short.batched(2).text_batcher.max_len == 2048


def test_session_limits_may_be_numpy_integers(engine):
    import numpy as np
    talk = engine.session(max_new_tokens=np.int64(3), max_units=np.int32(4))
    assert len(list(talk.respond(text="Hi."))[-1].trace["tokens"]) <= 3


def test_audio_patch_in_user_text_is_refused_and_forgotten(engine):
    session = new_session(engine, max_new_tokens=5)
    with pytest.raises(EchoXError, match="reserved for speech"):
        list(session.respond(text="say <audio_patch> now"))
    assert session.turns == []
    run_turn(session, text="fine")
    assert len(session.turns) == 2


def test_speech_of_a_segment_arrives_while_the_llm_still_writes(engine, monkeypatch):
    """Pipelining: audio of the first segment comes before the last text. Once a segment has gone
    to the speech threads the LLM waits (up to a minute) for its audio, so that a loaded machine
    cannot make the speech late; an engine that spoke only after the LLM would time out here."""
    session = new_session(engine)
    submitted, spoke = threading.Event(), threading.Event()
    submit, vocode = SpeechPipeline.submit, SpeechPipeline._vocode

    def noted_submit(self, *args):
        submit(self, *args)
        submitted.set()

    def noted_vocode(self, *args):
        vocode(self, *args)
        if self.first_audio_ms is not None:
            spoke.set()
    monkeypatch.setattr(SpeechPipeline, "submit", noted_submit)
    monkeypatch.setattr(SpeechPipeline, "_vocode", noted_vocode)
    decode = session.decoder.decode

    def waiting_decode(*args, **kwargs):
        for token in decode(*args, **kwargs):
            if submitted.is_set() and not spoke.is_set():
                assert spoke.wait(60), "a segment went to the speech threads, but no audio came while the LLM waited"
            yield token
    monkeypatch.setattr(session.decoder, "decode", waiting_decode)
    events, trace = run_turn(session, text="Tell me more.")
    kinds = [type(e).__name__ for e in events]
    assert len(trace["segments"]) > 1 and "AudioChunk" in kinds
    first_audio = kinds.index("AudioChunk")
    assert "TextDelta" in kinds[first_audio:]


def test_one_turn_at_a_time_per_engine(engine):
    first = new_session(engine).respond(text="One.")
    next(first)  # the first turn is under way
    with pytest.raises(EchoXError, match="answering another turn"):
        next(new_session(engine).respond(text="Two."))
    first.close()  # abandoning a turn stops its speech worker and frees the engine
    assert not any(t.name in ("echox-echo", "echox-vocoder") and t.is_alive() for t in threading.enumerate())
    run_turn(new_session(engine, max_new_tokens=4), text="Three.")


def test_a_session_made_during_another_turns_prefill_leaves_that_turn_alone(engine, tiny_model_dir, monkeypatch):
    """A new session captures its decode step on its own cache, which points the shared LLM layers
    at that cache: it must wait until a running prefill has written the turn's cache."""
    _, alone = run_turn(new_session(engine, max_units=1), text="Tell me something.")
    engine = echox_engine.load(tiny_model_dir)  # its own, with no spare caches
    paused, resume = threading.Event(), threading.Event()
    forward = engine.lm.forward

    def pausing_forward(x, *args, **kwargs):
        if x.shape[1] > 1 and not paused.is_set():  # the next prefill (a decode step has one position)
            paused.set()
            resume.wait(10)
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(engine.lm, "forward", pausing_forward)
    result = {}
    turn = threading.Thread(target=lambda: result.update(trace=run_turn(
        new_session(engine, max_units=1), text="Tell me something.")[1]))
    turn.start()
    assert paused.wait(30)
    maker = threading.Thread(target=lambda: new_session(engine))
    maker.start()
    maker.join(1.0)  # long enough to capture, were it not held back
    resume.set()
    turn.join(60)
    maker.join(60)
    assert result["trace"]["tokens"] == alone["tokens"]


EXIT_MID_TURN = """
import sys, threading
import echox.engine as E
talk = E.load(sys.argv[1]).session(max_new_tokens=60, max_units=200)
started = threading.Event()

def answer():
    for event in talk.respond(text="Talk for a while."):
        started.set()
threading.Thread(target=answer, daemon=True).start()
started.wait(60)
"""


def test_a_program_that_ends_mid_turn_exits_cleanly(tiny_model_dir):
    """A turn still running in a daemon thread (a server's) is stopped at exit: a thread inside a
    torch op when the interpreter ends aborted the process (exit code 134)."""
    done = subprocess.run([sys.executable, "-c", EXIT_MID_TURN, str(tiny_model_dir)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr[-2000:]


EXIT_WHILE_READING_SPEECH = """
import sys, threading, torch
import echox.engine as E
talk = E.load(sys.argv[1]).session(max_new_tokens=8, max_units=20)
reading, read = threading.Event(), E.speech_input

def reading_speech(audio):
    reading.set()
    return read(audio)
E.speech_input = reading_speech
stereo = (torch.randn(2, 44100 * 30), 44100)  # about half a second of resampling

def answer():
    for event in talk.respond(audio=stereo):
        pass
threading.Thread(target=answer, daemon=True).start()
reading.wait(60)
"""


def test_a_program_that_ends_while_a_turn_reads_its_speech_exits_cleanly(tiny_model_dir):
    """The exit hook waits for a turn that is still reading (resampling) its speech, too."""
    done = subprocess.run([sys.executable, "-c", EXIT_WHILE_READING_SPEECH, str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr[-2000:]


def test_the_exit_hook_does_not_wait_for_a_turn_nobody_reads(engine):
    """A turn suspended in its caller (who stopped reading) runs nothing once its speech has
    stopped: the exit hook returns then, not at its time limit."""
    turn = new_session(engine, max_new_tokens=40).respond(text="Talk for a while.")
    next(turn)
    started = time.monotonic()
    echox_engine.stop_turns_at_exit(seconds=30)
    assert time.monotonic() - started < 10
    assert isinstance(list(turn)[-1], TurnDone)  # stopped: it ends at once, as cancelled
    assert not any(t.name in ("echox-echo", "echox-vocoder") and t.is_alive() for t in threading.enumerate())


def test_the_exit_hook_waits_for_threads_whose_turn_let_go():
    """A second Ctrl-C cut short the turn's own wait for its speech (or every-core) threads after the
    turn had let go of its session; the hook did not wait for them then, and a thread still inside a
    torch op as the interpreter ended aborted the process."""
    import echox.speech_pipeline as speech_pipeline
    finish = threading.Event()

    class Speech:  # a pipeline whose turn has let go, its thread still ending
        threads = [threading.Thread(target=finish.wait, args=(5,), name="echox-vocoder")]
    pipeline = Speech()
    speech_pipeline.PIPELINES.add(pipeline)
    prefill = threading.Thread(target=lambda: cpu_threads.on_every_core(lambda: finish.wait(5)))
    for thread in [*pipeline.threads, prefill]:
        thread.start()
    threading.Timer(0.3, finish.set).start()
    echox_engine.stop_turns_at_exit(seconds=10)
    assert not pipeline.threads[0].is_alive() and not cpu_threads.on_every_core_running()
    prefill.join()


def test_multi_speaker_vocoder_speaks_with_the_released_speaker(tmp_path):
    from echox.config import VocoderConfig
    from echox.tiny import TinySpec, write_tiny_checkpoint
    voices = VocoderConfig(upsample_initial_channel=64, embedding_dim=32, duration_hidden=32, num_speakers=4,
                           speaker_embedding_dim=32)
    engine = echox_engine.load(write_tiny_checkpoint(tmp_path, TinySpec(vocoder=voices)))
    assert engine.speaker == 1
    events, trace = run_turn(new_session(engine), text="Say something.")
    for index, segment in enumerate(trace["segments"]):
        streamed = [e.samples for e in events if isinstance(e, AudioChunk) and e.segment == index]
        if segment["units"]:
            offline = engine.vocoder(torch.tensor(segment["units"]), speaker=1)
            torch.testing.assert_close(torch.cat(streamed), offline, atol=1e-5, rtol=0)


def test_speech_as_samples_at_any_rate(engine):
    from echox.audio import prepare_speech, resample
    stereo = resample(demo_question(1.5), 16000, 44100).repeat(2, 1)  # [2, N] at 44.1 kHz
    _, from_pair = run_turn(new_session(engine, max_new_tokens=6), audio=(stereo, 44100))
    _, from_16k = run_turn(new_session(engine, max_new_tokens=6), audio=prepare_speech(stereo, 44100))
    assert from_pair["speech_frames"] == from_16k["speech_frames"] and from_pair["tokens"] == from_16k["tokens"]
    with pytest.raises(EchoXError, match="sample rate"):
        list(new_session(engine).respond(audio=(stereo, 0)))


def test_leaving_the_loop_at_turn_done_keeps_the_turn(engine):
    session = new_session(engine, max_new_tokens=6)
    for event in session.respond(text="Hello."):
        if isinstance(event, TurnDone):
            break
    assert [t.role for t in session.turns] == ["user", "assistant"]
    assert session.turns[1].text == event.text


def test_a_caller_holding_the_turn_after_turn_done_does_not_lock_the_session_or_engine(engine):
    session = new_session(engine, max_new_tokens=6)
    first = session.respond(text="Hello.")
    for event in first:  # stop at TurnDone, keeping the generator
        if isinstance(event, TurnDone):
            break
    _, next_turn = run_turn(session, text="And then?")  # this session's next turn
    _, other = run_turn(new_session(engine, max_new_tokens=6), text="Hi.")  # another session's turn
    first.close()  # letting go of the old turn later frees nothing twice
    _, after = run_turn(session, text="Once more.")
    assert [t.role for t in session.turns] == ["user", "assistant"] * 3
    assert next_turn["tokens"] and other["tokens"] and after["tokens"]


def test_speech_of_a_turn_given_up_after_its_prefill_is_not_reused_by_the_next_turn(engine):
    """A turn left before TurnDone leaves the conversation as it was, though its speech rows stay in the
    KV cache: the next turn's speech must be read anew, not matched to them by position."""
    session = new_session(engine, max_new_tokens=12)
    given_up = session.respond(audio=demo_question(2.0))
    next(given_up)  # the first text: the question's speech is in the cache
    given_up.close()
    other = (torch.randn(48000, generator=torch.Generator().manual_seed(3)) * 0.1, 16000)
    _, reused = run_turn(session, audio=other)
    _, fresh = run_turn(new_session(engine, max_new_tokens=12), audio=other)
    assert reused["prompt_ids"] == fresh["prompt_ids"]
    assert reused["tokens"] == fresh["tokens"]
    torch.testing.assert_close(torch.tensor(reused["scores"]), torch.tensor(fresh["scores"]), atol=1e-5, rtol=0)


def test_a_seeded_session_after_reset_samples_as_a_new_one(engine):
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    session = new_session(engine, sampling=sampling, max_new_tokens=10)
    first = run_turn(session, text="Hi")[1]["tokens"]
    session.reset()
    assert run_turn(session, text="Hi")[1]["tokens"] == first


def test_a_seeded_turn_given_up_leaves_the_next_turn_as_if_it_never_was(engine):
    """Its draws moved the session's sampling counter: put back with the rest of the conversation."""
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    session = new_session(engine, sampling=sampling, max_new_tokens=10)
    given_up = session.respond(text="Tell me a story.")
    for _ in zip(range(3), given_up):  # a few text deltas: a few draws
        pass
    given_up.close()
    after = run_turn(session, text="Hi")[1]["tokens"]
    assert after == run_turn(new_session(engine, sampling=sampling, max_new_tokens=10), text="Hi")[1]["tokens"]


def test_a_cancel_while_the_speech_is_read_is_not_lost(engine, monkeypatch):
    """Reading (and resampling) long speech takes a while; a barge-in then still stops the turn."""
    session = new_session(engine)
    read = echox_engine.speech_input

    def read_while_cancelled(audio):
        session.cancel()  # as another thread would, mid-read
        with pytest.raises(EchoXError, match="answering a turn"):
            session.reset()  # nor can a reset slip in before the turn has begun
        return read(audio)
    monkeypatch.setattr(echox_engine, "speech_input", read_while_cancelled)
    _, trace = run_turn(session, audio=demo_question(1.0))
    assert trace["cancelled"] and trace["tokens"] == []
    assert [t.role for t in session.turns] == ["user", "assistant"]


def _slowed(session, monkeypatch, seconds: float = 0.03):
    """Slow the session's LLM down, until the test ends (the KV cache goes on to later sessions)."""
    decode = session.decoder.decode

    def slow_decode(*args, **kwargs):
        for token in decode(*args, **kwargs):
            time.sleep(seconds)
            yield token
    monkeypatch.setattr(session.decoder, "decode", slow_decode)


def test_cancel_from_another_thread_keeps_what_was_said(engine, monkeypatch):
    session = new_session(engine, max_new_tokens=40)
    _slowed(session, monkeypatch)
    events = []
    for event in session.respond(text="Talk for a while."):
        events.append(event)
        if sum(isinstance(e, TextDelta) for e in events) == 5:
            threading.Thread(target=session.cancel).start()
    done = events[-1]
    assert isinstance(done, TurnDone) and done.trace["cancelled"]
    said = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert 5 <= len(done.trace["tokens"]) < 40 and said == done.text == engine.tokenizer.decode(done.trace["tokens"])
    assert [t.role for t in session.turns] == ["user", "assistant"] and session.turns[1].text == said
    assert not any(t.name in ("echox-echo", "echox-vocoder") and t.is_alive() for t in threading.enumerate())
    _, trace = run_turn(session, text="Go on.")  # the engine and the session are free again
    assert not trace["cancelled"] and len(session.turns) == 4
    session.cancel()  # no turn in progress: nothing happens, to this turn or the next
    assert not run_turn(session, text="And?")[1]["cancelled"]


def test_last_text_comes_when_the_llm_stops_not_after_the_speech(engine, monkeypatch):
    """An answer that ends inside a multi-byte character still has all its text out before any of
    the speech of its final segment, which is only cut when the LLM stops."""
    tok = engine.tokenizer
    ids = tok.encode("ok \u00e9")[:-1]  # the last token is the first byte of a two-byte character
    session = new_session(engine, max_new_tokens=len(ids) + 5)
    decode = session.decoder.decode

    def scripted(*args, **kwargs):
        for token, token_id in zip(decode(*args, **kwargs), ids):
            token.id = token_id
            yield token
    monkeypatch.setattr(session.decoder, "decode", scripted)
    events, trace = run_turn(session, text="Say it.")
    kinds = [type(e).__name__ for e in events]
    assert "AudioChunk" in kinds
    assert len(kinds) - 1 - kinds[::-1].index("TextDelta") < kinds.index("AudioChunk")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == trace["text"] == tok.decode(ids)


def test_streamed_text_equals_decoding_the_whole_answer(engine):
    events, trace = run_turn(new_session(engine, max_new_tokens=60), audio=demo_question(1.0))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 10 and "".join(deltas) == engine.tokenizer.decode(trace["tokens"])


@pytest.mark.parametrize("audio, message", [
    (torch.full((16000,), float("nan")), "NaN"),
    (torch.zeros(0, 16000), "no audio samples"),
    (torch.tensor(0.5), r"got shape \[\]"),
    (torch.ones(16000, dtype=torch.bool), "bool"),
    ([0.0] * 16000, "list"),
    (b"question.wav", "bytes"),
    ((torch.zeros(16000), "16000"), "rate"),
    ((torch.zeros(16000), 30_000_001), "rate"),
])
def test_unusable_speech_is_refused_before_any_work_and_leaves_the_session_as_it_was(engine, audio, message):
    session = new_session(engine, max_new_tokens=4)
    run_turn(session, text="First.")
    turns, speech, cached = list(session.turns), dict(session.speech), list(session.decoder.cached)
    with pytest.raises(EchoXError, match=message):
        list(session.respond(audio=audio))
    assert session.turns == turns and session.speech == speech and session.decoder.cached == cached
    _, trace = run_turn(session, text="Second.")  # not poisoned: a text turn still answers
    assert len(set(trace["tokens"])) > 1


def test_speech_layouts_users_have_give_the_same_turn(engine):
    question = demo_question(1.0)
    pcm16 = (question * 32767).round().to(torch.int16)
    _, channels_first = run_turn(new_session(engine, max_new_tokens=6), audio=pcm16.repeat(2, 1))
    _, channels_last = run_turn(new_session(engine, max_new_tokens=6), audio=pcm16.repeat(2, 1).T.numpy())
    _, as_float = run_turn(new_session(engine, max_new_tokens=6), audio=pcm16.float() / 32768)
    assert channels_first["tokens"] == channels_last["tokens"] == as_float["tokens"]
    assert channels_first["speech_frames"] == as_float["speech_frames"]


@pytest.mark.parametrize("text", ["   ", "\n\t", 42])
def test_blank_or_non_string_text_is_refused(engine, text):
    with pytest.raises(EchoXError, match="whitespace|str"):
        list(new_session(engine).respond(text=text))


def test_an_error_in_the_speech_threads_ends_the_turn_with_that_error(engine, monkeypatch):
    """It surfaces in respond() (no hang, even while the LLM still writes) and the turn is forgotten."""
    generate = engine.echo.generate

    def failing(*args, **kwargs):
        for n, unit in enumerate(generate(*args, **kwargs)):
            if n == 3:
                raise RuntimeError("echo decoder failed")
            yield unit
    monkeypatch.setattr(engine.echo, "generate", failing)
    session = new_session(engine)
    with pytest.raises(RuntimeError, match="echo decoder failed"):
        list(session.respond(text="Speak."))
    assert session.turns == []
    assert not any(t.name in ("echox-echo", "echox-vocoder") and t.is_alive() for t in threading.enumerate())
    monkeypatch.undo()
    run_turn(session, text="Again.")


@pytest.mark.skipif(usable_cores() < 2, reason="one core: nothing to compare")
def test_a_solo_turn_starts_on_every_core_with_the_same_bits(monkeypatch):
    """Speech encoder, adapter and prefill run on every core in a solo turn: at a width where
    torch does split their products among threads, the turn is the one they give on one thread."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from random_engine import build_engine  # a random engine at a width that threads (512)
    session = build_engine("mid", "cpu").session(sampling=GREEDY, max_new_tokens=6, max_units=12)
    turns = []
    for cores, count in ((cpu_threads.every_core, usable_cores()), (functools.partial(torch_threads, 1), 1)):
        entered = []  # (thread, torch threads) each time the turn takes the cores

        @contextlib.contextmanager
        def recorded(cores=cores, entered=entered):
            with cores():
                entered.append((threading.current_thread().name, torch.get_num_threads()))
                yield

        monkeypatch.setattr(cpu_threads, "every_core", recorded)
        session.reset()
        events, trace = run_turn(session, audio=demo_question(2.0))
        assert entered == [(cpu_threads.EVERY_CORE_THREAD, count)]
        del trace["timings_ms"]
        turns.append((trace, torch.cat([e.samples for e in events if isinstance(e, AudioChunk)])))
    assert turns[0][0] == turns[1][0] and torch.equal(turns[0][1], turns[1][1])


@pytest.mark.skipif(usable_cores() < 2, reason="one core: nothing to compare")
@pytest.mark.parametrize("rows, inputs, outputs", [
    (1500, 1280, 5120), (1500, 5120, 1280),  # Whisper-large-v3's feed-forward, all 1500 frames
    (300, 4096, 14336), (300, 3072, 8192),  # EchoX-8B and -3B gate/up over a 300-position prompt
])
def test_released_shape_products_give_the_same_bits_on_every_core(rows, inputs, outputs):
    """What `every_core` rests on, at the shapes of the released models (not only the test ones)."""
    gen = torch.Generator().manual_seed(rows + inputs)
    x, weight = torch.randn(rows, inputs, generator=gen), torch.randn(outputs, inputs, generator=gen) * 0.02
    with torch_threads(1):
        alone = torch.nn.functional.linear(x, weight)
    with every_core():
        assert torch.equal(torch.nn.functional.linear(x, weight), alone)


@pytest.mark.skipif(usable_cores() < 2, reason="one core: no thread counts to choose from")
def test_speech_threads_keep_the_engines_count_and_the_echo_decoder_takes_every_core_while_the_vocoder_waits(
        engine, monkeypatch):
    echo_counts, vocoder_counts = [], []
    echo_units, voice = engine.echo_units, engine.voice

    def counted_units(*args):
        for unit in echo_units(*args):
            echo_counts.append(torch.get_num_threads())  # the count the step that made it ran with
            yield unit

    def counted_voice():
        stream = voice()
        for name in ("push", "flush"):
            def counted(*args, call=getattr(stream, name)):
                vocoder_counts.append(torch.get_num_threads())
                return call(*args)
            setattr(stream, name, counted)
        return stream
    monkeypatch.setattr(engine, "echo_units", counted_units)
    monkeypatch.setattr(engine, "voice", counted_voice)
    with torch_threads(usable_cores()):  # torch's count for new threads is now every core
        run_turn(new_session(engine), audio=demo_question(2.0))
    assert engine.threads == 1 and vocoder_counts and set(vocoder_counts) == {1}
    assert echo_counts[0] == usable_cores() and set(echo_counts) <= {1, usable_cores()}
