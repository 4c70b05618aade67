"""Energy VAD: where speech starts and stops, and how the API's threshold maps to a level."""

import asyncio
import json

import pytest
import torch

from echox.serve.audio_edge import pcm16_base64
from echox.serve.connection import Connection
from echox.serve.session_config import SessionConfig
from echox.serve.vad import EnergyVad, threshold_rms

RATE = 24000


def tone(seconds: float, rms: float) -> torch.Tensor:
    t = torch.arange(int(seconds * RATE)) / RATE
    return rms * 2 ** 0.5 * torch.sin(2 * torch.pi * 220 * t)


def test_threshold_maps_linearly_in_decibels():
    assert abs(threshold_rms(0.5) - 10 ** (-30 / 20)) < 1e-12
    assert threshold_rms(0.0) < threshold_rms(0.5) < threshold_rms(1.0) == 1.0


def test_speech_start_and_stop_positions_in_odd_pushes():
    quiet, loud = tone(1.0, 0.001), tone(0.6, 0.1)
    audio = torch.cat([quiet, loud, quiet])
    vad = EnergyVad(threshold=0.5, silence_duration_ms=300, rate=RATE, origin=1000)
    events = []
    for start in range(0, audio.numel(), 777):  # pushes that do not line up with 20 ms frames
        events += vad.push(audio[start:start + 777])
    assert [e.kind for e in events] == ["started", "stopped"]
    frame = RATE // 50
    assert abs(events[0].sample - (1000 + quiet.numel())) <= frame  # within one frame of the onset
    assert abs(events[1].sample - (1000 + quiet.numel() + loud.numel())) <= frame
    assert not vad.speaking


def test_short_pauses_do_not_end_speech_and_quiet_input_never_starts_it():
    vad = EnergyVad(threshold=0.5, silence_duration_ms=500, rate=RATE)
    kinds = [e.kind for e in vad.push(torch.cat([tone(0.5, 0.1), tone(0.3, 0.0), tone(0.5, 0.1)]))]
    assert kinds == ["started"] and vad.speaking
    assert EnergyVad(threshold=0.5, silence_duration_ms=500, rate=RATE).push(tone(2.0, 0.02)) == []


def test_one_append_holding_two_utterances_commits_each_with_its_own_speech():
    """The connection commits the speech up to where the VAD heard its end; what follows in the same
    append stays for the next item (it all went into the first item, and the second committed nothing)."""
    async def committed_seconds() -> list[float]:
        config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4).updated({"audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200, "create_response": False}}}})
        connection = Connection(None, config, None, None, max_buffer_bytes=10 ** 7, idle_timeout_s=60)
        connection.restart_vad()
        speech, pause = tone(1.0, 0.1), tone(0.7, 0.0)
        connection.append({"audio": pcm16_base64(torch.cat([speech, pause, speech, pause]))})
        return [samples.numel() / RATE for samples in connection.pending_audio]

    first, second = asyncio.run(committed_seconds())
    assert 1.0 < first < 1.3  # the speech and the 200 ms that ended it
    assert 1.0 < second < 1.6  # the same, after up to 300 ms of padding before it


def test_speech_events_give_where_the_items_audio_starts_and_ends():
    """As the API has it: audio_start_ms includes the prefix padding, audio_end_ms the silence that
    ended the speech, so the two span exactly the committed audio (they gave the onset and the last
    loud frame, 300 ms and 200 ms inside it)."""
    async def events_and_audio() -> tuple[list[dict], list[int]]:
        config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4).updated({"audio": {"input": {
            "turn_detection": {"type": "server_vad", "prefix_padding_ms": 300, "silence_duration_ms": 200,
                               "create_response": False}}}})
        connection = Connection(None, config, None, None, max_buffer_bytes=10 ** 7, idle_timeout_s=60)
        connection.restart_vad()
        for block in torch.cat([tone(1.0, 0.0), tone(1.0, 0.1), tone(0.5, 0.0)] * 2).split(RATE // 10):
            connection.append({"audio": pcm16_base64(block)})
        await asyncio.sleep(0)
        events = [connection.outbox.get_nowait() for _ in range(connection.outbox.qsize())]
        return events, [samples.numel() * 1000 // RATE for samples in connection.pending_audio]

    events, committed_ms = asyncio.run(events_and_audio())
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    ends = [e["audio_end_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert starts == [700, 3200] and all(abs(end - want) <= 20 for end, want in zip(ends, [2200, 4700]))
    assert [end - start for start, end in zip(starts, ends)] == committed_ms


@pytest.mark.parametrize("onset_ms", [1000, 1020, 1060, 1080])
def test_the_whole_prefix_padding_is_kept_when_speech_starts_across_two_appends(onset_ms):
    """100 ms appends, as the page sends them: speech that starts late in one append is heard as
    speech in the next; the padding before it used to be cut to 300 ms before the first append's
    end (220-280 ms before the onset)."""
    async def started_ms() -> int:
        config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4).updated({"audio": {"input": {
            "turn_detection": {"type": "server_vad", "prefix_padding_ms": 300, "create_response": False}}}})
        connection = Connection(None, config, None, None, max_buffer_bytes=10 ** 7, idle_timeout_s=60)
        connection.restart_vad()
        audio = torch.cat([tone(onset_ms / 1000, 0.0), tone(1.0, 0.1)])
        for block in audio.split(RATE // 10):
            connection.append({"audio": pcm16_base64(block)})
        await asyncio.sleep(0)
        events = [connection.outbox.get_nowait() for _ in range(connection.outbox.qsize())]
        return next(e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started")

    assert asyncio.run(started_ms()) == onset_ms - 300


def test_speech_longer_than_the_buffer_is_cut_into_turns_and_its_end_is_heard():
    """9 s of sound into a 4 s buffer: the speech so far is committed whenever the buffer is full,
    the rest is a turn of its own, and the silence after it ends the last. The append used to be
    refused before the VAD heard it: the VAD then never heard the silence, and refused every append
    after (30 s of speech or steady noise with the default buffer)."""
    async def events_of_a_long_tone() -> tuple[list[str], list[float]]:
        config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4).updated({"audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500, "create_response": False}}}})
        connection = Connection(None, config, None, None, max_buffer_bytes=4 * RATE * 2, idle_timeout_s=60)
        connection.restart_vad()
        for block in torch.cat([tone(9.0, 0.1), tone(2.0, 0.0)]).split(RATE // 10):
            connection.append({"audio": pcm16_base64(block)})
        await asyncio.sleep(0)  # post() hands the events to the loop
        kinds = [connection.outbox.get_nowait()["type"] for _ in range(connection.outbox.qsize())]
        return kinds, [samples.numel() / RATE for samples in connection.pending_audio]

    kinds, committed = asyncio.run(events_of_a_long_tone())
    assert "error" not in kinds
    assert kinds.count("input_audio_buffer.speech_started") == kinds.count("input_audio_buffer.committed") == 3
    assert committed[:2] == [4.0, 4.0] and 1.0 < committed[2] < 1.6  # the last second and the silence that ended it


def test_a_manual_commit_during_speech_leaves_its_end_an_item_id():
    """The commit takes the speech's item id; the VAD, still hearing speech, then ended it with
    item_id None (speech_stopped, committed, conversation.item.added): the SDK's schema needs a string."""
    async def events_after_a_manual_commit() -> list[dict]:
        config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4).updated({"audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200, "create_response": False}}}})
        connection = Connection(None, config, None, None, max_buffer_bytes=10 ** 7, idle_timeout_s=60)
        connection.restart_vad()
        connection.append({"audio": pcm16_base64(tone(0.5, 0.1))})
        connection.commit_event({})
        connection.append({"audio": pcm16_base64(torch.cat([tone(0.5, 0.1), tone(0.5, 0.0)]))})
        await asyncio.sleep(0)
        return [connection.outbox.get_nowait() for _ in range(connection.outbox.qsize())]

    events = asyncio.run(events_after_a_manual_commit())
    stopped = next(event for event in events if event["type"] == "input_audio_buffer.speech_stopped")
    items = [event["item"]["id"] for event in events if event["type"] == "conversation.item.added"]
    assert isinstance(stopped["item_id"], str) and len(items) == 2 and all(isinstance(i, str) for i in items)
    assert items[1] == stopped["item_id"] != items[0]


@pytest.mark.parametrize("interruption", [{"type": "input_audio_buffer.clear"},
                                          {"type": "session.update", "session": {"audio": {"input": {
                                              "turn_detection": None}}}}], ids=["clear", "vad-off"])
def test_speech_cut_short_by_a_clear_or_turning_the_vad_off_still_stops(interruption):
    """A clear, or turn detection switched off, during speech forgot the speech: the client had its
    speech_started and never a speech_stopped. Now the speech stops there, with its item id."""
    async def events_around(event: dict) -> list[dict]:
        config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4).updated({"audio": {"input": {
            "turn_detection": {"type": "server_vad", "create_response": False}}}})
        connection = Connection(None, config, None, None, max_buffer_bytes=10 ** 7, idle_timeout_s=60)
        connection.restart_vad()
        connection.append({"audio": pcm16_base64(tone(0.5, 0.1))})
        connection.handle(json.dumps(event))
        await asyncio.sleep(0)
        return [connection.outbox.get_nowait() for _ in range(connection.outbox.qsize())]

    events = asyncio.run(events_around(interruption))
    assert [e["type"] for e in events][:2] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"]
    assert events[1]["item_id"] == events[0]["item_id"] and events[1]["audio_end_ms"] == 500


def test_a_click_is_not_speech_but_a_word_is_dated_from_its_first_loud_frame():
    """A 20 ms click or a 60 ms tap (a cough, a key) used to start speech, and so cancel an answer
    (barge-in); speech now needs MIN_SPEECH_MS of loud frames in a row, and starts at the first."""
    vad = EnergyVad(threshold=0.5, silence_duration_ms=300, rate=RATE, origin=0)
    quiet = tone(0.5, 0.0)
    assert vad.push(torch.cat([quiet, tone(0.02, 0.2), quiet, tone(0.06, 0.2), quiet])) == []
    events = vad.push(torch.cat([tone(0.3, 0.1), quiet]))
    assert [e.kind for e in events] == ["started", "stopped"]
    onset = 3 * quiet.numel() + int(0.08 * RATE)  # where the 0.3 s word begins
    assert abs(events[0].sample - onset) <= RATE // 50  # within one frame


def test_the_beta_apis_turn_detection_is_read_like_the_gas():
    """session.turn_detection (beta) was ignored: a beta client turning on server_vad got null back and
    waited for an answer that never came."""
    from echox.serve.protocol import ProtocolError
    config = SessionConfig(temperature=0.0, top_p=1.0, max_output_tokens=4)
    beta = config.updated({"turn_detection": {"type": "server_vad", "silence_duration_ms": 200}})
    ga = config.updated({"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 200}}}})
    assert beta == ga and beta.turn_detection.silence_duration_ms == 200
    assert beta.updated({"turn_detection": None}).turn_detection is None
    with pytest.raises(ProtocolError) as refused:
        config.updated({"turn_detection": {"type": "semantic_vad"}})
    assert refused.value.param == "session.turn_detection.type"
