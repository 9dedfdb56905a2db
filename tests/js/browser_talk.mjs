// In a browser: @openai/agents-realtime's RealtimeSession over WebRTC, speaking the (fake) microphone to a Realtime
// server, with an ek_ client secret. Loaded by browser_talk.html?key=ek_...&url=http://HOST/v1/realtime/calls.
//
// The SDK comes from its own ESM browser build (dist/bundle of the pinned npm package, served beside this file
// as sdk/). Nothing is changed in it: the transport gets an <audio> element to play the answer into (as a page
// would) and the URL of the server; the session is the SDK's default (semantic VAD, a transcript of the user).
// When the answer has played and both transcripts are in (or after the timeout), window.result holds what came
// back: every server event (audio-free), the SDK's errors and history, and the answer track's audio energy.
import { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession } from './sdk/openai-realtime-agents.mjs';

const params = new URLSearchParams(location.search);
const timeoutMs = Number(params.get('timeout_s') || '150') * 1000;
const events = [];
const errors = [];
const started = performance.now();
let done;
const finished = new Promise((resolve) => { done = resolve; });

const audioElement = document.createElement('audio');
audioElement.autoplay = true;
document.body.append(audioElement);
const transport = new OpenAIRealtimeWebRTC({ audioElement });
const agent = new RealtimeAgent({ name: 'Assistant', instructions: 'You are a helpful assistant.' });
const session = new RealtimeSession(agent, { transport, model: 'mini-omni' });

const seen = (type) => events.some((event) => event.type === type);
const complete = () => seen('output_audio_buffer.stopped') && seen('response.output_audio_transcript.done')
  && (seen('conversation.item.input_audio_transcription.completed')
      || seen('conversation.item.input_audio_transcription.failed'));

transport.on('*', (event) => {
  events.push({ ...event, at_ms: Math.round(performance.now() - started) });
  if (complete()) done();
});
session.on('error', (event) => {
  const error = event.error?.error ?? event.error;
  errors.push(error instanceof Error ? String(error) : error);
});

// The answer track, as the browser received it: inbound RTP audio statistics, polled.
let track = { energy: 0, samples: 0, peakLevel: 0 };
async function pollTrack() {
  const pc = transport.connectionState.peerConnection;
  if (!pc) return;
  for (const report of (await pc.getStats()).values()) {
    if (report.type === 'inbound-rtp' && report.kind === 'audio') {
      track = {
        energy: report.totalAudioEnergy ?? 0,
        samples: report.totalSamplesReceived ?? 0,
        peakLevel: Math.max(track.peakLevel, report.audioLevel ?? 0),
      };
    }
  }
}
const poller = setInterval(() => { pollTrack().catch(() => {}); }, 200);

let connectError = null;
try {
  await session.connect({ apiKey: params.get('key'), url: params.get('url') });
} catch (error) {
  connectError = String(error);
  done();
}
const timer = setTimeout(done, timeoutMs);
await finished;
clearTimeout(timer);
await new Promise((resolve) => setTimeout(resolve, 500)); // the last statistics
await pollTrack().catch(() => {});
clearInterval(poller);
window.result = {
  connect_error: connectError,
  call_id: transport.callId ?? null,
  events,
  errors,
  track,
  history: session.history.filter((item) => item.type === 'message').map((item) => ({
    role: item.role,
    transcripts: item.content.map((part) => part.transcript ?? part.text ?? null),
  })),
  seconds: (performance.now() - started) / 1000,
};
session.close();
