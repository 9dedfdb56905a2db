// miniomni web client: speaks the OpenAI Realtime protocol to /v1/realtime.
"use strict";
const RATE = 24000;
const $ = (id) => document.getElementById(id);
let ws = null, ctx = null, player = null, micStream = null, talking = false;
let turn = null, waitingSince = null, responding = false;
const userTurns = new Map();  // item id -> the element showing what the user said

function setStatus(text) { $("status").textContent = text; }

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

function send(event) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event)); }

function newTurn(who) {
  const el = document.createElement("div");
  el.className = "turn";
  el.innerHTML = `<span class="latency"></span><div class="who">${who}</div><div class="text"></div>`;
  $("turns").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

async function connect() {
  ctx = new AudioContext({ sampleRate: RATE });
  await ctx.audioWorklet.addModule("static/worklets.js");
  player = new AudioWorkletNode(ctx, "player");
  player.connect(ctx.destination);
  micStream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  const capture = new AudioWorkletNode(ctx, "capture");
  ctx.createMediaStreamSource(micStream).connect(capture);
  capture.port.onmessage = (event) => {
    if ($("mode").value === "vad" || talking) send({ type: "input_audio_buffer.append", audio: toBase64(floatToPcm16(event.data)) });
  };
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
  const key = $("apikey").value.trim();
  ws = key ? new WebSocket(url, ["realtime", `openai-insecure-api-key.${key}`]) : new WebSocket(url);
  ws.onopen = () => { configure(); setStatus("Connected. " + ($("mode").value === "vad" ? "Just talk." : "Hold the button to talk.")); };
  ws.onclose = (event) => { setStatus(`Disconnected${event.reason ? ": " + event.reason : ""}.`); $("talk").disabled = $("interrupt").disabled = true; };
  ws.onmessage = (message) => handle(JSON.parse(message.data));
  $("connect").disabled = true;
  $("interrupt").disabled = false;
  $("talk").disabled = $("mode").value !== "ptt";
}

function configure() {
  const vad = $("mode").value === "vad";
  send({ type: "session.update", session: {
    type: "realtime", output_modalities: ["audio"],
    audio: { input: { format: { type: "audio/pcm", rate: RATE }, transcription: { model: "mini-omni" },
                      turn_detection: vad ? { type: "server_vad", threshold: 0.5, silence_duration_ms: 600 } : null },
             output: { format: { type: "audio/pcm", rate: RATE } } } } });
}

function handle(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      setStatus("Listening…");
      if (responding) player.port.postMessage("clear");  // barge-in: the server cancels the answer
      break;
    case "input_audio_buffer.speech_stopped":
      waitingSince = performance.now(); setStatus("Thinking…"); break;
    case "input_audio_buffer.committed": {
      const mine = newTurn("You");
      mine.classList.add("user");
      mine.querySelector(".text").textContent = "…";
      userTurns.set(event.item_id, mine);
      break;
    }
    case "conversation.item.input_audio_transcription.delta": {
      const mine = userTurns.get(event.item_id);
      if (mine) {
        const text = mine.querySelector(".text");
        text.textContent = (text.textContent === "…" ? "" : text.textContent) + event.delta;
      }
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const mine = userTurns.get(event.item_id);
      if (mine) mine.querySelector(".text").textContent = event.transcript || "(nothing heard)";
      userTurns.delete(event.item_id);
      break;
    }
    case "conversation.item.input_audio_transcription.failed": {
      const mine = userTurns.get(event.item_id);
      if (mine) mine.querySelector(".text").textContent = "(not transcribed)";
      userTurns.delete(event.item_id);
      break;
    }
    case "response.created":
      responding = true; turn = newTurn("Mini-Omni"); turn.dataset.first = ""; break;
    case "response.output_audio.delta":
    case "response.audio.delta":
      if (turn && !turn.dataset.first && waitingSince !== null) {
        turn.dataset.first = "1";
        turn.querySelector(".latency").textContent = `first audio ${Math.round(performance.now() - waitingSince)} ms`;
      }
      player.port.postMessage(fromBase64(event.delta));
      setStatus("Speaking…");
      break;
    case "response.output_audio_transcript.delta":
    case "response.audio_transcript.delta":
    case "response.output_text.delta":
    case "response.text.delta":
      if (turn) turn.querySelector(".text").textContent += event.delta;
      break;
    case "response.done":
      responding = false;
      setStatus(event.response && event.response.status === "cancelled" ? "Interrupted." : "Done. Talk again.");
      break;
    case "error":
      setStatus(`Error: ${event.error && event.error.message}`); break;
  }
}

$("connect").onclick = () => connect().catch((err) => setStatus(`Could not start: ${err.message}`));
$("mode").onchange = () => { $("talk").disabled = !ws || $("mode").value !== "ptt"; if (ws) configure(); };
const startTalking = () => { if ($("talk").disabled) return; talking = true; $("talk").classList.add("active");
  if (responding) { send({ type: "response.cancel" }); player.port.postMessage("clear"); }
  send({ type: "input_audio_buffer.clear" }); };
const stopTalking = () => { if (!talking) return; talking = false; $("talk").classList.remove("active");
  waitingSince = performance.now(); send({ type: "input_audio_buffer.commit" }); send({ type: "response.create" }); setStatus("Thinking…"); };
$("talk").onpointerdown = startTalking; $("talk").onpointerup = stopTalking; $("talk").onpointerleave = stopTalking;
$("interrupt").onclick = () => { send({ type: "response.cancel" }); player.port.postMessage("clear"); };
