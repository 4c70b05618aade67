"""The browser client, in headless Chromium with a fake microphone playing a WAV: the page records,
streams to `echox serve`, and shows the answer's text and the audio it received and scheduled.
The page is watched from an init script (PROBES): every AudioContext, microphone stream and socket
it makes, and what it sends."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.audio import write_wav
from echox.cli import demo_question
from echox.serve.launch import ServerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(apt-get install chromium; .ci/run does)")

PROBES = """
window.probe = { contexts: [], streams: [], sockets: [], appends: [], samples: 0, stopped: 0, holdAnswers: false };
// Every context runs at 44.1 kHz (a usual microphone rate, Firefox's often), so the page resamples to 24 kHz.
window.AudioContext = class extends AudioContext {
  constructor(options) { super({ ...options, sampleRate: 44100 }); probe.contexts.push(this); }
};
const getUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (c) => { const s = await getUserMedia(c); probe.streams.push(s); return s; };
AudioBufferSourceNode.prototype.stop = ((stop) => function (...args) { probe.stopped++; return stop.apply(this, args); })(
  AudioBufferSourceNode.prototype.stop);
window.WebSocket = class extends WebSocket {
  constructor(...args) {
    super(...args);
    probe.sockets.push(this);
    // With holdAnswers, the call's context pauses as an answer begins: its audio stays scheduled, unplayed.
    this.addEventListener("message", (m) => {
      if (probe.holdAnswers && JSON.parse(m.data).type === "response.created") probe.contexts.at(-1).suspend();
    });
  }
  send(data) {
    const e = JSON.parse(data);
    if (e.type === "input_audio_buffer.append") {
      probe.appends.push(probe.sockets.indexOf(this));
      probe.samples += atob(e.audio).length / 2; // pcm16
    }
    super.send(data);
  }
};
"""
# What the page holds now: the state of each AudioContext, microphone and socket it made.
HELD = """({contexts: probe.contexts.map((c) => c.state),
            microphones: probe.streams.map((s) => s.getTracks().map((t) => t.readyState).join()),
            sockets: probe.sockets.map((s) => s.readyState), start: document.getElementById("start").disabled,
            hangup: document.getElementById("hangup")?.disabled})"""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(["--model", tiny_model_dir, "--threads", "1", "--temperature", "0",
                        "--max-new-tokens", 24, "--max-units", 60]) as running:
        yield running


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        yield playwright.chromium


def launch(chromium, microphone: Path):
    """Headless Chromium whose microphone plays `microphone` once, then silence."""
    return chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}%noloop", "--autoplay-policy=no-user-gesture-required"])


def open_page(browser, server):
    page = browser.new_page()
    page.add_init_script(PROBES)
    page.goto(server.http_url + "/")
    return page


@pytest.fixture
def quiet_browser(chromium, tmp_path):
    microphone = tmp_path / "quiet.wav"
    write_wav(microphone, torch.zeros(16000 * 10))
    browser = launch(chromium, microphone)
    yield browser
    browser.close()


def test_page_records_answers_and_plays_in_headless_chromium(server, chromium, tmp_path):
    microphone = tmp_path / "question.wav"  # 1.5 s of voice, then silence for server VAD to end the turn
    write_wav(microphone, torch.cat([demo_question(1.5), torch.zeros(16000 * 4)]))
    browser = launch(chromium, microphone)
    try:
        page = open_page(browser, server)
        page.evaluate("probe.holdAnswers = true")
        page.click("#start")
        page.wait_for_function("Number(document.body.dataset.responses) >= 1", timeout=90_000)
        answer = page.inner_text(".turn span")
        outcome = page.inner_text(".turn small")
        audio_ms = int(page.evaluate("document.body.dataset.audioMs"))
        errors = page.inner_text("#errors")
        # The answer's audio is all scheduled, none played: it is still answering, and Stop silences it.
        assert page.inner_text("#status") == "answering" and page.is_enabled("#stop")
        page.click("#stop")
        assert page.inner_text("#status") == "connected: listening" and not page.is_enabled("#stop")
        assert page.evaluate("probe.stopped") > 0
    finally:
        browser.close()
    assert errors == ""
    assert answer.strip()  # the tiny model's (random) text is on the page
    assert outcome.startswith(("completed", "incomplete")) and "first audio after" in outcome
    assert audio_ms > 100  # and its speech arrived and was scheduled for playback


def test_a_dropped_call_stops_its_microphone_and_start_records_it_once(server, quiet_browser):
    # The server ends a call on its own (idle timeout, restart, too many connections); closing the socket
    # from the page looks the same to it. The call's microphone, worklet and context must end with it,
    # or the next Start sends the microphone twice.
    page = open_page(quiet_browser, server)
    page.click("#start")
    page.wait_for_function("probe.appends.length > 0")
    page.evaluate("probe.sockets[0].close()")
    page.wait_for_function("!document.getElementById('start').disabled")
    page.wait_for_function("probe.contexts[0].state === 'closed'", timeout=5_000)
    assert page.evaluate(HELD) == {"contexts": ["closed"], "microphones": ["ended"], "sockets": [3], "start": False,
                                   "hangup": True}
    page.click("#start")
    page.wait_for_function("probe.appends.filter((s) => s === 1).length >= 5")
    held = page.evaluate(HELD)
    assert held["contexts"] == ["closed", "running"] and held["microphones"] == ["ended", "live"]
    # 24 kHz of pcm16 goes out per second of microphone time: resampled from 44.1 kHz, and sent once.
    sent = "[probe.samples, probe.contexts[1].currentTime]"
    samples, time = page.evaluate(sent)
    page.wait_for_timeout(2000)
    more_samples, later = page.evaluate(sent)
    assert 0.9 * 24000 < (more_samples - samples) / (later - time) < 1.1 * 24000


def test_a_failed_start_closes_its_audio_context_and_the_next_start_clears_its_error(server, quiet_browser):
    page = quiet_browser.new_page()
    page.add_init_script(PROBES + """let refusals = 2; // the microphone is denied twice, then allowed
        const allowed = navigator.mediaDevices.getUserMedia;
        navigator.mediaDevices.getUserMedia = async (c) => {
          if (refusals-- > 0) throw new DOMException("Permission denied", "NotAllowedError");
          return allowed(c);
        };""")
    page.goto(server.http_url + "/")
    assert page.get_attribute("#status", "aria-live") == "polite" and page.get_attribute("#errors", "role") == "alert"
    for _ in range(2):
        page.click("#start")
        page.wait_for_function("!document.getElementById('start').disabled")
    page.wait_for_function("probe.contexts.every((c) => c.state === 'closed')", timeout=5_000)
    assert len(page.evaluate("probe.contexts")) == 2
    assert "NotAllowedError" in page.inner_text("#errors")
    page.click("#start")
    page.wait_for_function("probe.appends.length > 0")
    assert page.inner_text("#errors") == ""
    assert page.evaluate("document.activeElement.id") == "hangup"  # not lost with the disabled Start


def test_audio_of_a_cancelled_answer_is_dropped(server, quiet_browser):
    # Deltas already on their way when Stop is pressed, or speech cuts in, still arrive; here they are
    # handed to the page as if from the server.
    page = open_page(quiet_browser, server)
    page.click("#start")
    page.wait_for_function("document.getElementById('status').textContent === 'connected: listening'")

    def arrives(event):
        page.evaluate("(e) => probe.sockets[0].dispatchEvent(new MessageEvent('message', {data: JSON.stringify(e)}))", event)

    def audio(response_id):  # 100 ms of silence
        arrives({"type": "response.output_audio.delta", "response_id": response_id, "delta": "AAAA" * 1600})

    arrives({"type": "response.created", "response": {"id": "resp_1"}})
    audio("resp_1")
    page.click("#stop")
    audio("resp_1")
    arrives({"type": "response.created", "response": {"id": "resp_2"}})
    audio("resp_2")
    arrives({"type": "input_audio_buffer.speech_started"})  # barge-in
    audio("resp_2")
    assert page.evaluate("document.body.dataset.audioMs") == "200"


def test_hang_up_ends_the_call(server, quiet_browser):
    page = open_page(quiet_browser, server)
    page.click("#start")
    page.wait_for_function("probe.appends.length > 0")
    page.click("#hangup", timeout=5_000)
    page.wait_for_function("probe.contexts[0].state === 'closed' && probe.sockets[0].readyState === 3", timeout=5_000)
    assert page.evaluate(HELD) == {"contexts": ["closed"], "microphones": ["ended"], "sockets": [3], "start": False,
                                   "hangup": True}
    assert page.inner_text("#status") == "not connected"


# (rate, hz) -> the pcm16 the page's worklet, as served, sends from a half-scale tone in an offline context
# at `rate`: one second, rendered as fast as it goes, of which the 100 ms blocks posted (at least 9).
TAPPED_TONE = """async ([rate, hz]) => {
  const context = new OfflineAudioContext({ numberOfChannels: 1, length: rate, sampleRate: rate });
  await context.audioWorklet.addModule("/static/microphone-worklet.js");
  const tap = new AudioWorkletNode(context, "microphone-tap"), sent = [];
  tap.port.onmessage = (m) => sent.push(...new Int16Array(m.data));
  const tone = new OscillatorNode(context, { frequency: hz });
  tone.connect(new GainNode(context, { gain: 0.5 })).connect(tap);
  tap.connect(context.destination);
  tone.start();
  await context.startRendering();
  for (let wait = 0; sent.length < 9 * 2400 && wait < 500; wait++) await new Promise((r) => setTimeout(r, 10));
  return sent;
}"""


@pytest.mark.parametrize("rate", [48000, 44100])
def test_the_worklet_filters_out_what_24_khz_cannot_hold(server, quiet_browser, rate):
    # 15 kHz would fold back to 9 kHz at 24 kHz; 1 kHz must come through as it is.
    # tests/test_microphone_worklet.py checks the filter closely; this runs it in a real AudioWorklet.
    page = quiet_browser.new_page()
    page.goto(server.http_url + "/")
    above, speech = (np.array(page.evaluate(TAPPED_TONE, [rate, hz])[100:9 * 2400]) / 32767 for hz in (15000, 1000))
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(100, 9 * 2400) / 24000)
    assert np.sqrt(np.mean(above ** 2)) < 1e-4 * 0.5  # 77 dB down at least (here: all zeros)
    assert np.sqrt(np.mean((speech - expected) ** 2)) < 1e-3 * 0.5  # right gain, frequency and phase
