"""The page's microphone worklet, run outside an audio graph: its MicrophoneTap is fed render quanta
by hand, in node and in headless Chromium (each where installed), and the pcm16 it would send is
compared with what 24 kHz should hold. tests/test_serve_browser.py runs it in a real AudioWorklet."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from echox.serve.server import STATIC

WORKLET = STATIC / "microphone-worklet.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# The worklet's MicrophoneTap as `Tap`, from args.source at args.rate. Its globals are stand-ins: a base
# class whose port collects the posts, registerProcessor and sampleRate.
LOAD_TAP = """
  const posted = [];
  class AudioWorkletProcessor {
    constructor() { this.port = { postMessage: (buffer) => posted.push(new Int16Array(buffer)) }; }
  }
  let Tap;
  new Function("AudioWorkletProcessor", "registerProcessor", "sampleRate", args.source)(
    AudioWorkletProcessor, (name, processor) => { Tap = processor; }, args.rate);
"""

# (args) -> the tap's pcm16 samples: everything it posted, then its unfinished block; with args.raw,
# the resampler's own samples instead, before pcm16 rounds them. The input is `signal` (samples) or
# `tones` ([[Hz, amplitude], ...] for `seconds`), fed `quantum` samples per process() call (128 in a
# browser; all at once when quantum is 0).
RUN_TAP = "(args) => {" + LOAD_TAP + """
  const tap = new Tap(), out = [];
  if (args.raw) tap.push = (sample) => out.push(sample);
  let signal = Float32Array.from(args.signal || []);
  if (args.tones) {
    signal = new Float32Array(Math.round(args.seconds * args.rate));
    for (const [hz, amplitude] of args.tones)
      for (let k = 0; k < signal.length; k++) signal[k] += amplitude * Math.sin(2 * Math.PI * hz * k / args.rate);
  }
  const quantum = args.quantum || signal.length;
  for (let i = 0; i < signal.length; i += quantum) tap.process([[signal.subarray(i, i + quantum)]]);
  if (!args.raw)
    for (const block of [...posted, tap.block.subarray(0, tap.filled)]) for (const s of block) out.push(s);
  return out;
}"""

# (args) -> how long the tap takes to make at args.rate (the fastest of 3, in ms) and its resampler's
# table of filters (how many floats) for its number of taps.
BUILD_TAP = "(args) => {" + LOAD_TAP + """
  const tap = new Tap();
  return { floats: tap.resampler.filters.length, taps: tap.resampler.taps };
}"""

# The worklet before its table of filters was bounded: for rates it tabulated each phase of, it still does.
EXACT_WORKLET_COMMIT = "288d833e66a228d989884297601bcd52a56cf242"


@pytest.fixture(scope="module")
def chromium_page():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser.new_page()
        browser.close()


@pytest.fixture(params=["node", "chromium"])
def js(request):
    """js(script, args) -> what the function `script` returns for `args`, run in node or in Chromium."""
    if request.param == "node":
        if shutil.which("node") is None:
            pytest.skip("node is not installed")

        def run(script, args):
            main = f"let s = ''; process.stdin.on('data', (d) => s += d).on('end', () => " \
                   f"process.stdout.write(JSON.stringify(({script})(JSON.parse(s)))));"
            done = subprocess.run(["node", "-e", main], input=json.dumps(args), capture_output=True, text=True,
                                  check=True)
            return json.loads(done.stdout)
        return run
    page = request.getfixturevalue("chromium_page")
    return page.evaluate


@pytest.fixture
def tap(js):
    """tap(rate, quantum=128, signal=None, tones=None, seconds=1.0, raw=False, source=None) -> what the worklet
    sends, in [-1, 1] (with raw, what it resamples, before pcm16); source: the worklet's text, if not as it is."""
    def sent(rate, quantum=128, signal=None, tones=None, seconds=1.0, raw=False, source=None):
        args = {"source": source or WORKLET.read_text(), "rate": rate, "quantum": quantum, "tones": tones,
                "seconds": seconds, "raw": raw, "signal": None if signal is None else [float(s) for s in signal]}
        out = np.array(js(RUN_TAP, args), dtype=np.float64)
        return out if raw else out / 32767
    return sent


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def tone(hz, n, amplitude=0.5):
    """What 24 kHz holds of a tone that starts at time 0."""
    return amplitude * np.sin(2 * np.pi * hz * np.arange(n) / 24000)


EDGE = 100  # output samples at each end the filter sees the silence before the start in (2.5 ms wide)


@pytest.mark.parametrize("rate", [48000, 44100, 96000, 96001, 44101])
@pytest.mark.parametrize("hz", [12500, 15000, 20000])
def test_sound_above_12_khz_does_not_fold_back(tap, rate, hz):
    # At 24 kHz, 15 kHz would read as 9 kHz (24 - 15): the low-pass must take it out first.
    # The filter reaches 80 dB down from 12 kHz; pcm16's rounding sets the floor here near 100 dB.
    out = tap(rate, tones=[[hz, 0.9]])[EDGE:-EDGE]
    assert 20 * np.log10(rms(out) / (0.9 / np.sqrt(2)) + 1e-12) < -75


@pytest.mark.parametrize("rate, hz", [(rate, hz) for rate in (48000, 44100, 96000, 22050, 96001, 44101)
                                      for hz in (1000, 9000)]
                         + [(16000, 1000), (16000, 6000)])  # the passband: 10/12 of the lower Nyquist frequency
def test_speech_band_passes_at_its_own_frequency_and_gain(tap, rate, hz):
    # The filter is centred on each output sample: output n is the tone at time n / 24000, not later.
    out = tap(rate, tones=[[hz, 0.5]])
    expected = tone(hz, len(out))
    assert len(out) >= 23900
    assert rms((out - expected)[EDGE:]) < 3e-4 * rms(expected)  # -70 dB: gain, frequency and phase all right


@pytest.mark.parametrize("rate", [44100, 48000, 16000, 96001])
def test_render_quanta_join_seamlessly(tap, rate):
    # The filter's taps span several 128-sample quanta: its history is carried from one to the next.
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, rate // 4)
    whole = tap(rate, quantum=0, signal=noise)
    assert np.array_equal(tap(rate, quantum=128, signal=noise), whole)
    assert np.array_equal(tap(rate, quantum=131, signal=noise), whole)


@pytest.mark.parametrize("rate", [44100, 44101])
def test_odd_rates_keep_time(tap, rate):
    # 80 outputs per 147 inputs at 44.1 kHz (24000 per 44101 at 44101 Hz, between interpolated phases),
    # counted in whole numbers: after 10 s only the filter's look-ahead (half its 2.5 ms, 31 samples) is
    # still to come, and the tone's phase has not slipped.
    out = tap(rate, tones=[[1000, 0.5]], seconds=10.0)
    assert 0 <= 240000 - len(out) <= 31
    expected = tone(1000, len(out))
    assert rms((out - expected)[-24000:]) < 3e-4 * rms(expected)


def test_24000_hz_passes_samples_through(tap):
    samples = np.random.default_rng(1).uniform(-1.2, 1.2, 5000).astype(np.float32)
    expected = np.floor(np.clip(samples.astype(np.float64), -1, 1) * 32767 + 0.5) / 32767
    assert np.array_equal(tap(24000, signal=samples), expected)


@pytest.mark.parametrize("rate", [96001, 44101])
def test_rates_with_few_factors_in_common_with_24_khz_build_a_small_table(js, rate):
    # From 96001 Hz, 24000 phases would each need a filter: 23 MB, built in about half a second on the
    # audio thread. At most 512 are tabulated (and one more to interpolate up to): 0.5 MB, a few ms.
    # The size is what is checked: a time bound would depend on the machine running the test.
    built = js(BUILD_TAP, {"source": WORKLET.read_text(), "rate": rate})
    assert built["floats"] <= 513 * built["taps"] and built["floats"] * 4 < 1e6


@pytest.mark.parametrize("rate", [44100, 48000, 11025])  # 11.025 kHz: 320 phases, the most of the usual rates
def test_rates_within_the_bound_keep_their_exact_filters(tap, rate):
    # Bounding the table interpolates only past 512 phases: below, every sample is what it was.
    try:
        exact = subprocess.run(["git", "show", f"{EXACT_WORKLET_COMMIT}:echox/serve/static/microphone-worklet.js"],
                               cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not in a git checkout that holds the worklet's earlier version")
    noise = np.random.default_rng(2).uniform(-0.5, 0.5, rate // 2)
    assert np.array_equal(tap(rate, signal=noise, raw=True), tap(rate, signal=noise, raw=True, source=exact))
