// The page's microphone tap: an AudioWorklet that resamples the capture stream from the context's
// rate (`sampleRate`: the browser's default, often 44.1 or 48 kHz) to the protocol's 24 kHz, and
// hands it to the page as pcm16 blocks of 100 ms, each sent as one input_audio_buffer.append.
// The context is not made at 24 kHz for the browser to resample: Firefox refuses to connect a
// microphone to a context whose rate differs from the device's (Mozilla bugs 1674892, 1725336).
const RATE = 24000;
const BLOCK = 2400; // samples per block: 100 ms at 24 kHz, a few dozen events per second at most

class MicrophoneTap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / RATE; // input samples per output sample
    // Where the next output sample falls, in input samples after `last` (the input sample before this
    // render quantum's first): output samples interpolate across quanta.
    this.position = 0;
    this.last = 0;
    this.block = new Int16Array(BLOCK);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0][0]; // mono: the page asks for one channel
    if (!channel) return true;
    // Linear interpolation, without a low-pass first: speech has little above 12 kHz to fold back,
    // and the server resamples to 16 kHz for its speech encoder anyway.
    for (; this.position < channel.length; this.position += this.step) {
      const i = Math.floor(this.position), after = channel[i], before = i === 0 ? this.last : channel[i - 1];
      this.push(before + (after - before) * (this.position - i));
    }
    this.position -= channel.length;
    this.last = channel[channel.length - 1];
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
