// The page's microphone tap: an AudioWorklet that resamples the capture stream from the context's
// rate (`sampleRate`: the browser's default, often 44.1 or 48 kHz) to the protocol's 24 kHz, and
// hands it to the page as pcm16 blocks of 100 ms, each sent as one input_audio_buffer.append.
// The context is not made at 24 kHz for the browser to resample: Firefox refuses to connect a
// microphone to a context whose rate differs from the device's (Mozilla bugs 1674892, 1725336).
const RATE = 24000;
const BLOCK = 2400; // samples per block: 100 ms at 24 kHz, a few dozen events per second at most

// The low-pass, relative to the lower of the two Nyquist frequencies (12 kHz from 44.1 or 48 kHz):
// flat up to 10/12 of it (10 kHz), at least STOPBAND_DB down from it on. From 12 kHz up, whatever
// the microphone hears would fold back below 12 kHz at 24 kHz: fans, keyboards and sibilants do,
// and without the filter they land in the band the server hears. The sinc's cutoff sits mid-way
// (11 kHz), and a Kaiser window trades the taps' length for the stopband (Kaiser's formulas: 122
// taps at 48 kHz, 112 at 44.1 kHz, 2.5 ms of sound centred on each output sample).
const PASSBAND = 10 / 12;
const STOPBAND_DB = 80;

// Past this many phases, the filters are interpolated rather than each tabulated. A rate that shares
// few factors with 24 kHz (96001, 44101 or 7999 Hz; a fractional rate rounded to such a number) has
// up = 24000 phases: a table of tens of MB, up to a second of the audio thread to build. The usual
// rates stay under it and keep their exact filters (up: 80 from 44.1 kHz, 320 from 11.025 kHz).
// Interpolating linearly between 512 phases per input sample takes about (pi f / 512)^2 / 3 off a tone
// of f cycles per input sample (the sinc^2 droop of a triangle): under -110 dB anywhere in the
// passband (f < 5/12), far under pcm16's own rounding (-98 dB); the stopband keeps its depth.
const PHASES = 512;

function gcd(a, b) {
  return b ? gcd(b, a % b) : a;
}

// The modified Bessel function I0, for the Kaiser window: its power series, to double precision.
function besselI0(x) {
  let sum = 1, term = 1;
  for (let k = 1; term > 1e-17 * sum; k++) {
    term *= (x / (2 * k)) ** 2;
    sum += term;
  }
  return sum;
}

// A windowed-sinc resampler from `from` Hz to `to` Hz, fed one block at a time. Output sample n is
// the filtered input at time n / to exactly (no delay, no drift): with from / to = down / up in lowest
// terms, it falls `phase` / up of an input sample past an input sample. Positions are kept as whole
// numbers of 1/up input samples, so they never round. The filters are tabulated at `steps` phases
// evenly over one input sample: each of the up phases has its own (up = 80 from 44.1 kHz, 1 from
// 48 kHz) unless up exceeds PHASES, and then an output between two tabulated phases is their linear
// interpolation.
class Resampler {
  constructor(from, to) {
    const g = gcd(from, to);
    this.up = to / g;
    this.down = from / g;
    this.steps = Math.min(this.up, PHASES);
    const nyquist = Math.min(from, to) / 2;
    const cutoff = ((1 + PASSBAND) / 2) * nyquist / from; // in cycles per input sample
    const transition = (1 - PASSBAND) * nyquist / from;
    this.half = Math.ceil((STOPBAND_DB - 7.95) / (2.285 * 2 * Math.PI * transition) / 2); // taps per side
    this.taps = 2 * this.half;
    const beta = 0.1102 * (STOPBAND_DB - 8.7);
    // One filter more, a whole input sample on: the upper end of the last interval to interpolate in.
    this.filters = new Float32Array((this.steps + 1) * this.taps);
    for (let phase = 0; phase <= this.steps; phase++) {
      const filter = this.filters.subarray(phase * this.taps, (phase + 1) * this.taps);
      for (let j = 0; j < this.taps; j++) {
        const t = phase / this.steps + this.half - 1 - j; // from input sample j (of the taps) to the output
        const x = Math.PI * 2 * cutoff * t;
        const window = besselI0(beta * Math.sqrt(Math.max(0, 1 - (t / this.half) ** 2)));
        filter[j] = (x === 0 ? 1 : Math.sin(x) / x) * window;
      }
      // Each phase sums to exactly 1 (which also stands for the window's 1 / I0(beta)): the same gain
      // at 0 Hz in every phase, or a DC offset would come out modulated at the phases' rate. So do
      // the interpolated ones, between two that each sum to 1.
      const sum = filter.reduce((a, b) => a + b);
      for (let j = 0; j < this.taps; j++) filter[j] /= sum;
    }
    // The last taps - 1 input samples (zeros before the first), then the block being resampled.
    this.input = new Float32Array(this.taps - 1 + 128);
    // The next output's position in 1/up input samples, counted from input[0]: output 0 falls on the
    // first input sample. It comes out once the input has reached `half` samples past it.
    this.position = (this.taps - 1) * this.up;
  }

  process(block, push) {
    const kept = this.taps - 1, length = kept + block.length;
    if (this.input.length < length) { // a longer render quantum than before
      const input = new Float32Array(length);
      input.set(this.input.subarray(0, kept));
      this.input = input;
    }
    this.input.set(block, kept);
    for (;;) {
      const i = Math.floor(this.position / this.up); // the input sample at or before the output
      if (i + this.half >= length) break;
      // Its phase in tabulated steps: a whole number (fraction 0) wherever up <= PHASES.
      const step = (this.position - i * this.up) * this.steps / this.up, below = Math.floor(step);
      const first = i - this.half + 1, fraction = step - below, sum = this.filtered(first, below);
      push(fraction ? sum + fraction * (this.filtered(first, below + 1) - sum) : sum);
      this.position += this.down;
    }
    this.input.copyWithin(0, block.length, length);
    this.position -= block.length * this.up;
  }

  // The input from input[first] on through the filter tabulated at `step`.
  filtered(first, step) {
    const filter = step * this.taps;
    let sum = 0;
    for (let j = 0; j < this.taps; j++) sum += this.input[first + j] * this.filters[filter + j];
    return sum;
  }
}

class MicrophoneTap extends AudioWorkletProcessor {
  constructor() {
    super();
    // A 24 kHz context passes its samples through; the rate is rounded for gcd (rates are whole Hz).
    this.resampler = Math.round(sampleRate) === RATE ? null : new Resampler(Math.round(sampleRate), RATE);
    this.push = this.push.bind(this);
    this.block = new Int16Array(BLOCK);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0][0]; // mono: the page asks for one channel
    if (!channel) return true;
    if (this.resampler) this.resampler.process(channel, this.push);
    else channel.forEach((sample) => this.push(sample));
    return true;
  }

  push(sample) {
    this.block[this.filled++] = Math.round(Math.max(-1, Math.min(1, sample)) * 32767);
    if (this.filled === BLOCK) {
      this.port.postMessage(this.block.buffer, [this.block.buffer]);
      this.block = new Int16Array(BLOCK);
      this.filled = 0;
    }
  }
}

registerProcessor("microphone-tap", MicrophoneTap);
