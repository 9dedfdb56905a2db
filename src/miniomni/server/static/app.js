// miniomni web client: the OpenAI Realtime protocol over WebRTC (POST v1/realtime/calls, the oai-events data
// channel, Opus tracks), or over the WebSocket v1/realtime when WebRTC fails. It never holds the server's API
// key in a connection: it asks v1/realtime/client_secrets for a short-lived ek_ key first.
"use strict";
const RATE = 24000;
const $ = (id) => document.getElementById(id);
let link = null;          // the open connection: {kind, send(event), close()}
let mic = null, meter = null, ctx = null, player = null, capture = null;
let talking = false, responding = false, waitingSince = null, clearTimer = null;
const bubbles = new Map();        // item id -> the user's bubble
const answers = new Map();        // response id -> the assistant's bubble
// What the page saw, for a person's console and for the tests.
const seen = window.miniomni = { transport: null, peakLevel: 0, speakers: [], latencies: [], fallback: null };

function setStatus(text) { $("status").textContent = text; }

function speaking(who, on) {
  $(who === "user" ? "who-user" : "who-assistant").classList.toggle("on", on);
  if (on && !seen.speakers.includes(who)) seen.speakers.push(who);
}

// ------------------------------------------------------------------ the conversation as bubbles

function bubble(kind, label) {
  const el = document.createElement("div");
  el.className = `bubble ${kind} pending`;
  el.innerHTML = `<div class="who">${label}<span class="latency"></span></div><div class="text">…</div>`;
  $("conversation").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function userBubble(itemId) {
  if (!bubbles.has(itemId)) bubbles.set(itemId, bubble("user", "You"));
  return bubbles.get(itemId);
}

function write(el, text, append) {
  const node = el.querySelector(".text");
  node.textContent = (append && !el.classList.contains("pending") ? node.textContent : "") + text;
  el.classList.remove("pending");
}

function firstAudio(responseId) {
  const el = answers.get(responseId);
  speaking("assistant", true);
  setStatus("Speaking…");
  if (!el || el.dataset.measured || waitingSince === null) return;
  const ms = Math.round(performance.now() - waitingSince);
  el.dataset.measured = "1";
  waitingSince = null;
  el.querySelector(".latency").textContent = `voice-to-voice ${ms} ms`;
  seen.latencies.push(ms);
  const sorted = [...seen.latencies].sort((a, b) => a - b);
  $("latency-summary").textContent =
    `voice-to-voice: last ${ms} ms, median ${sorted[Math.floor(sorted.length / 2)]} ms of ${sorted.length}`;
}

function handle(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      userBubble(event.item_id);
      speaking("user", true);
      setStatus("Listening…");
      if (responding && player) player.port.postMessage("clear");  // barge-in: the server cancels the answer
      break;
    case "input_audio_buffer.speech_stopped":
      waitingSince = performance.now(); speaking("user", false); setStatus("Thinking…"); break;
    case "input_audio_buffer.committed":
      userBubble(event.item_id); break;
    case "conversation.item.input_audio_transcription.delta":
      write(userBubble(event.item_id), event.delta, true); break;
    case "conversation.item.input_audio_transcription.completed":
      write(userBubble(event.item_id), event.transcript || "(nothing heard)", false); break;
    case "conversation.item.input_audio_transcription.failed":
      write(userBubble(event.item_id), `(not transcribed: ${event.error && event.error.message})`, false); break;
    case "response.created":
      responding = true; answers.set(event.response.id, bubble("assistant", "Mini-Omni")); break;
    case "output_audio_buffer.started":  // WebRTC: the answer's first audio is on the track now
      firstAudio(event.response_id); break;
    case "output_audio_buffer.stopped":
    case "output_audio_buffer.cleared":
      speaking("assistant", false); break;
    case "response.output_audio.delta":  // WebSocket: the audio comes in the events
      if (player) player.port.postMessage(fromBase64(event.delta));
      firstAudio(event.response_id);
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      const el = answers.get(event.response_id);
      if (el) write(el, event.delta, true);
      break;
    }
    case "response.done": {
      responding = false;
      const el = answers.get(event.response.id);
      if (el && event.response.status === "cancelled") el.classList.add("cancelled");
      if (el && el.classList.contains("pending")) write(el, "(no words)", false);
      setStatus(event.response.status === "cancelled" ? "Interrupted." : "Done. Talk again.");
      break;
    }
    case "error":
      if (event.error && event.error.code === "input_audio_buffer_full") break;  // push to talk, idle: cleared soon
      setStatus(`Error: ${event.error && event.error.message}`); break;
  }
}

// ------------------------------------------------------------------ the session's configuration and key

function sessionConfig() {
  const vad = $("mode").value === "vad";
  return {
    type: "realtime", output_modalities: ["audio"],
    audio: { input: { transcription: { model: "mini-omni" },
                      turn_detection: vad ? { type: "server_vad", threshold: 0.5, silence_duration_ms: 600 } : null } },
  };
}

async function errorText(reply) {
  try { return (await reply.json()).error.message; } catch { return `${reply.status} ${reply.statusText}`; }
}

class NeedKey extends Error {}

// A short-lived ek_ key bound to this session's configuration (the server's key, if typed, only asks for it).
async function clientSecret() {
  const key = $("apikey").value.trim();
  const reply = await fetch("v1/realtime/client_secrets", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify({ expires_after: { anchor: "created_at", seconds: 600 }, session: sessionConfig() }),
  });
  if (reply.status === 401) throw new NeedKey(key ? "the server refused this API key" : "this server needs its API key");
  if (!reply.ok) throw new Error(`no client key: ${await errorText(reply)}`);
  return (await reply.json()).value;
}

// ------------------------------------------------------------------ WebRTC

function iceGathered(pc, ms) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

function opened(channel, pc, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not connected within ${ms / 1000} s`)), ms);
    channel.addEventListener("open", () => { clearTimeout(timer); resolve(); });
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed") { clearTimeout(timer); reject(new Error("the peer connection failed")); }
    });
  });
}

async function connectWebRTC(key) {
  if (!window.RTCPeerConnection) throw new Error("this browser has no WebRTC");
  const pc = new RTCPeerConnection();
  for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
  const channel = pc.createDataChannel("oai-events");
  pc.ontrack = (event) => { $("remote").srcObject = event.streams[0] || new MediaStream([event.track]); };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 3000);
    const reply = await fetch("v1/realtime/calls", {
      method: "POST", body: pc.localDescription.sdp,
      headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${key}` },
    });
    if (!reply.ok) throw new Error(`the call was refused: ${await errorText(reply)}`);
    await pc.setRemoteDescription({ type: "answer", sdp: await reply.text() });
    await opened(channel, pc, 10000);
  } catch (error) {
    pc.close();
    throw error;
  }
  channel.onmessage = (message) => handle(JSON.parse(message.data));
  channel.onclose = () => disconnected("the data channel closed");
  const send = (event) => { if (channel.readyState === "open") channel.send(JSON.stringify(event)); };
  return { kind: "WebRTC", send, close: () => { channel.onclose = null; pc.close(); } };
}

// ------------------------------------------------------------------ WebSocket (raw PCM in events)

function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function fromBase64(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  const pcm = new Int16Array(bytes.buffer);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

function floatToPcm16(block) {
  const out = new Int16Array(block.length);
  for (let i = 0; i < block.length; i++) out[i] = Math.max(-1, Math.min(1, block[i])) * 32767;
  return out;
}

async function connectWebSocket(key) {
  ctx = new AudioContext({ sampleRate: RATE });
  await ctx.audioWorklet.addModule("static/worklets.js");
  player = new AudioWorkletNode(ctx, "player");
  player.connect(ctx.destination);
  player.port.onmessage = (event) => { if (event.data === "idle") speaking("assistant", false); };
  capture = new AudioWorkletNode(ctx, "capture");
  ctx.createMediaStreamSource(mic).connect(capture);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${location.pathname.replace(/[^/]*$/, "")}v1/realtime`;
  const ws = new WebSocket(url, ["realtime", `openai-insecure-api-key.${key}`]);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onclose = (event) => reject(new Error(`the WebSocket closed: ${event.reason || event.code}`));
  });
  const send = (event) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event)); };
  capture.port.onmessage = (event) => {
    if ($("mode").value === "vad" || talking) send({ type: "input_audio_buffer.append", audio: toBase64(floatToPcm16(event.data)) });
  };
  ws.onmessage = (message) => handle(JSON.parse(message.data));
  ws.onclose = (event) => disconnected(event.reason);
  const close = () => { ws.onclose = null; ws.close(); ctx.close(); ctx = player = capture = null; };
  return { kind: "WebSocket", send, close };
}

// ------------------------------------------------------------------ the microphone and its level

function startMeter() {
  meter = new AudioContext();
  const analyser = meter.createAnalyser();
  analyser.fftSize = 1024;
  meter.createMediaStreamSource(mic).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  meter.timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const x of samples) sum += x * x;
    const rms = Math.sqrt(sum / samples.length);
    const level = Math.max(0, Math.min(1, (20 * Math.log10(rms + 1e-9) + 60) / 60));  // -60 dBFS .. 0
    seen.peakLevel = Math.max(seen.peakLevel, level);
    $("level").style.width = `${Math.round(level * 100)}%`;
  }, 50);
}

// ------------------------------------------------------------------ connecting and the controls

async function connect() {
  $("connect").disabled = true;
  try {
    setStatus("Connecting…");
    const key = await clientSecret();  // first: a missing key is said before the microphone is asked for
    if (!mic) {
      mic = await navigator.mediaDevices.getUserMedia({ audio: {
        channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
      startMeter();
    }
    const choice = $("transport").value;
    seen.fallback = null;
    if (choice !== "websocket") {
      try {
        link = await connectWebRTC(key);
      } catch (error) {
        if (choice === "webrtc") throw error;
        seen.fallback = error.message;
      }
    }
    if (!link) link = await connectWebSocket(key);
    seen.transport = link.kind;
    $("transport-used").textContent = `over ${link.kind}` + (seen.fallback ? ` (WebRTC failed: ${seen.fallback})` : "");
    setStatus(`Connected. ${$("mode").value === "vad" ? "Just talk." : "Hold the button to talk."}`);
    $("connect").textContent = "Hang up";
    $("interrupt").disabled = false;
    $("talk").disabled = $("mode").value !== "ptt";
    keepBufferShort();
  } catch (error) {
    if (error instanceof NeedKey) {
      setStatus(`${error.message}: type it in “Server API key” and connect again (it is asked once, and only`
                + " to get a short-lived key).");
      $("apikey").focus();
    } else {
      setStatus(`Could not connect: ${error.message}`);
    }
  } finally {
    $("connect").disabled = false;
  }
}

function disconnected(reason) {
  if (link) link.close();
  link = null;
  clearInterval(clearTimer);
  responding = talking = false;
  speaking("user", false); speaking("assistant", false);
  setStatus(`Disconnected${reason ? ": " + reason : ""}.`);
  $("connect").textContent = "Connect";
  $("talk").disabled = $("interrupt").disabled = true;
}

// Push to talk over WebRTC: the track streams all the time, so the idle input is dropped every few seconds.
function keepBufferShort() {
  clearInterval(clearTimer);
  clearTimer = setInterval(() => {
    if (link && link.kind === "WebRTC" && $("mode").value === "ptt" && !talking) link.send({ type: "input_audio_buffer.clear" });
  }, 5000);
}

function interrupt() {
  if (!link) return;
  if (responding) link.send({ type: "response.cancel" });
  if (link.kind === "WebRTC") link.send({ type: "output_audio_buffer.clear" });
  else if (player) player.port.postMessage("clear");
}

$("connect").onclick = () => (link ? disconnected("you hung up") : connect());
$("mode").onchange = () => {
  $("talk").disabled = !link || $("mode").value !== "ptt";
  if (link) link.send({ type: "session.update", session: sessionConfig() });
};
const startTalking = () => {
  if ($("talk").disabled) return;
  talking = true; $("talk").classList.add("active"); speaking("user", true);
  if (responding) interrupt();
  link.send({ type: "input_audio_buffer.clear" });
};
const stopTalking = () => {
  if (!talking) return;
  talking = false; $("talk").classList.remove("active"); speaking("user", false);
  waitingSince = performance.now();
  link.send({ type: "input_audio_buffer.commit" }); link.send({ type: "response.create" }); setStatus("Thinking…");
};
$("talk").onpointerdown = startTalking; $("talk").onpointerup = stopTalking; $("talk").onpointerleave = stopTalking;
$("interrupt").onclick = interrupt;
window.addEventListener("pagehide", () => { if (link) link.close(); });  // the server ends the call at once
