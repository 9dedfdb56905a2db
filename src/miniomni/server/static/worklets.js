// Microphone capture: posts Float32 blocks of the input to the page.
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("capture", Capture);

// Gapless playback: a queue of Float32 blocks played back to back; "clear" empties it; says "idle" once the
// queue has played out.
class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0;
    this.playing = false;
    this.port.onmessage = (event) => {
      if (event.data === "clear") { this.queue = []; this.offset = 0; }
      else { this.queue.push(event.data); this.playing = true; }
    };
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const block = this.queue[0];
      const n = Math.min(out.length - i, block.length - this.offset);
      out.set(block.subarray(this.offset, this.offset + n), i);
      i += n; this.offset += n;
      if (this.offset >= block.length) { this.queue.shift(); this.offset = 0; }
    }
    out.fill(0, i);
    if (this.playing && !this.queue.length) { this.playing = false; this.port.postMessage("idle"); }
    return true;
  }
}
registerProcessor("player", Player);
