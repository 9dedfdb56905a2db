// Speaks a WAV file to a Realtime server through @openai/agents-realtime, with the SDK's default session,
// and prints what came back as JSON lines (one object per line, each with a "kind").
//
//   node talk.mjs --url ws://127.0.0.1:8000/v1/realtime?model=mini-omni --wav question.wav
//                 [--api-key KEY] [--model mini-omni] [--silence-s 12] [--timeout-s 60]
//
// The WAV must be 16-bit PCM, mono, 24 kHz. It is sent with session.sendAudio in 20 ms chunks at real-time
// pace, then silence (as a microphone would) until the answer and the user's transcript are in, or until
// --silence-s of silence has gone by. The only settings given to the SDK are the URL, the key and the
// model name; the RealtimeSession sends its own default session.update (transport: websocket). The agent
// has a tool, and once the answer is in the history is edited (the user's turn dropped), which makes the
// SDK send conversation.item.delete.
//
// Lines: {"kind":"sent","event":{...}} for each session.update the SDK sent, {"kind":"event","type":...} for
// every server event (audio deltas without their audio), {"kind":"error",...} for each error the SDK
// reported, and last {"kind":"summary",...}.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { RealtimeAgent, RealtimeSession, tool } from '@openai/agents-realtime';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    wav: { type: 'string' },
    'api-key': { type: 'string', default: 'not-needed' },
    model: { type: 'string', default: 'mini-omni' },
    'silence-s': { type: 'string', default: '12' },
    'timeout-s': { type: 'string', default: '60' },
  },
});
if (!args.url || !args.wav) {
  console.error('usage: node talk.mjs --url WS_URL --wav FILE.wav [--api-key KEY] [--model NAME]');
  process.exit(2);
}

const RATE = 24000;
const CHUNK_MS = 20;
const CHUNK_BYTES = (RATE * CHUNK_MS / 1000) * 2;

function print(object) {
  process.stdout.write(JSON.stringify(object) + '\n');
}

/** The PCM samples of a 16-bit mono WAV at 24 kHz, as bytes (its chunks walked, so extra chunks are fine). */
function readPcm16(path) {
  const file = readFileSync(path);
  if (file.toString('ascii', 0, 4) !== 'RIFF' || file.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error(`${path} is not a WAV file`);
  }
  let format = null;
  for (let at = 12; at + 8 <= file.length;) {
    const id = file.toString('ascii', at, at + 4);
    const size = file.readUInt32LE(at + 4);
    const body = at + 8;
    if (id === 'fmt ') {
      format = {
        code: file.readUInt16LE(body), channels: file.readUInt16LE(body + 2),
        rate: file.readUInt32LE(body + 4), bits: file.readUInt16LE(body + 14),
      };
    } else if (id === 'data') {
      if (!format || format.code !== 1 || format.channels !== 1 || format.rate !== RATE || format.bits !== 16) {
        throw new Error(`${path} must be 16-bit PCM, mono, ${RATE} Hz; its format is ${JSON.stringify(format)}`);
      }
      return file.subarray(body, body + Math.min(size, file.length - body));
    }
    at = body + size + (size % 2);
  }
  throw new Error(`${path} has no data chunk`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

const pcm = readPcm16(args.wav);
// An agent with a tool, as applications define them (this model never calls one; the session carries it).
const getWeather = tool({
  name: 'get_weather',
  description: 'The weather in a city.',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'], additionalProperties: false },
  strict: true,
  execute: async ({ city }) => `It is sunny in ${city}.`,
});
const agent = new RealtimeAgent({ name: 'Assistant', instructions: 'You are a helpful assistant.', tools: [getWeather] });
const session = new RealtimeSession(agent, { transport: 'websocket', model: args.model });

// Observe (never change) what the SDK sends: its session.update events are the point of this check.
const transport = session.transport;
const send = transport.sendEvent.bind(transport);
transport.sendEvent = (event) => {
  if (event.type === 'session.update') print({ kind: 'sent', event });
  return send(event);
};

let audioBytes = 0;
let inputTranscript = null;
let answerTranscript = null;
let responseStatus = null;
const errors = [];
const types = [];
let finished;
const outcome = new Promise((resolve) => { finished = resolve; });
const complete = () => responseStatus !== null && inputTranscript !== null;

session.on('audio', (event) => { audioBytes += event.data.byteLength; });
session.on('error', (event) => {
  const error = event.error;
  const detail = error?.error ?? error;
  errors.push(detail);
  print({ kind: 'error', error: detail instanceof Error ? String(detail) : detail });
});
session.transport.on('*', (event) => {
  types.push(event.type);
  const shown = { ...event };
  if (typeof shown.delta === 'string' && event.type === 'response.output_audio.delta') {
    shown.delta = `<${shown.delta.length} base64 characters>`;
  }
  print({ kind: 'event', ...shown });
  if (event.type === 'conversation.item.input_audio_transcription.completed') inputTranscript = event.transcript;
  if (event.type === 'conversation.item.input_audio_transcription.failed') inputTranscript = '';
  if (event.type === 'response.output_audio_transcript.done') answerTranscript = event.transcript;
  if (event.type === 'response.done') responseStatus = event.response?.status ?? 'unknown';
  if (complete()) finished();
});

const started = Date.now();
const timeout = setTimeout(() => finished(), Number(args['timeout-s']) * 1000);
await session.connect({ apiKey: args['api-key'], url: args.url });

// Real-time pace: chunk i leaves at start + i * 20 ms (no drift), the question and then silence.
const silence = new ArrayBuffer(CHUNK_BYTES);
const paceStart = Date.now();
let sentChunks = 0;
for (let at = 0; at < pcm.length; at += CHUNK_BYTES) {
  const piece = pcm.subarray(at, Math.min(at + CHUNK_BYTES, pcm.length));
  session.sendAudio(piece.buffer.slice(piece.byteOffset, piece.byteOffset + piece.byteLength));
  sentChunks += 1;
  await sleep(paceStart + sentChunks * CHUNK_MS - Date.now());
}
const silenceChunks = Math.round(Number(args['silence-s']) * 1000 / CHUNK_MS);
for (let i = 0; i < silenceChunks && !complete(); i++) {
  session.sendAudio(silence);
  sentChunks += 1;
  await sleep(paceStart + sentChunks * CHUNK_MS - Date.now());
}
await outcome;
clearTimeout(timeout);
const messages = (history) => history.filter((item) => item.type === 'message').map((item) => ({
  role: item.role,
  transcripts: item.content.map((part) => part.transcript ?? part.text ?? null),
}));
// The SDK's own view of the conversation (RealtimeSession.history): each message's role and transcripts.
const historyBefore = messages(session.history);
// An application edits its history: the SDK sends conversation.item.delete for what it drops.
let deleted = 0;
session.transport.on('conversation.item.deleted', () => { deleted += 1; });
session.updateHistory((history) => history.filter((item) => item.role !== 'user'));
for (let waited = 0; deleted === 0 && waited < 5000; waited += 50) await sleep(50);
await sleep(200);  // an error event about the delete would come by now
print({
  kind: 'summary',
  audio_bytes: audioBytes,
  input_transcript: inputTranscript,
  answer_transcript: answerTranscript,
  response_status: responseStatus,
  errors,
  event_types: [...new Set(types)],
  history: historyBefore,
  deleted,
  history_after_edit: messages(session.history),
  seconds: (Date.now() - started) / 1000,
});
session.close();
process.exit(0);
