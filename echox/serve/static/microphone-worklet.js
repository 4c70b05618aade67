// The page's microphone tap: an AudioWorklet that turns the capture stream (the AudioContext
// runs at 24 kHz, so the browser has already resampled it) into pcm16 blocks of 100 ms and
// hands them to the page, which sends each as one input_audio_buffer.append.
const BLOCK = 2400; // samples per block: 100 ms at 24 kHz, a few dozen events per second at most

class MicrophoneTap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Int16Array(BLOCK);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0][0]; // mono: the page asks for one channel
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.block[this.filled++] = Math.round(s * 32767);
      if (this.filled === BLOCK) {
        this.port.postMessage(this.block.buffer, [this.block.buffer]);
        this.block = new Int16Array(BLOCK);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("microphone-tap", MicrophoneTap);
