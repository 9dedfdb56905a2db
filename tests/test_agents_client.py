"""The @openai/agents-realtime client (npm), unchanged, against a real `miniomni serve` over WebSocket.

`tests/js/talk.mjs` makes a RealtimeAgent and a RealtimeSession with the SDK's defaults (only the URL, the
key and the model name point at the server), speaks a Piper question through `session.sendAudio` in 20 ms
chunks at real-time pace, then silence, and prints JSON lines: each session.update the SDK sent, each server
event, each error the SDK reported, and a summary. The SDK's default session asks for semantic VAD and a
transcript of the user's words; `tests/js/package-lock.json` pins the SDK.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import serve_process

from miniomni.server.realtime.protocol import SessionConfig, parse_session_update

JS = Path(__file__).parent / "js"
RATE = 24000
QUESTION = "What is the weather like in Paris today?"


def pinned_sdk_version() -> str:
    return json.loads((JS / "package.json").read_text())["dependencies"]["@openai/agents-realtime"]


@pytest.fixture(scope="session")
def node_project() -> Path:
    """tests/js with its pinned packages installed (`npm ci` once, kept in tests/js/node_modules)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs Node.js and npm (Node 20 or newer) to run the @openai/agents-realtime client")
    installed = JS / "node_modules" / "@openai" / "agents-realtime" / "package.json"
    lock = JS / "node_modules" / ".package-lock.json"
    fresh = (installed.exists() and lock.exists() and lock.stat().st_mtime >= (JS / "package-lock.json").stat().st_mtime
             and json.loads(installed.read_text())["version"] == pinned_sdk_version())
    if not fresh:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(JS)], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    assert json.loads(installed.read_text())["version"] == pinned_sdk_version()
    return JS


def piper_question(path: Path) -> None:
    """The question spoken by the Piper joe voice (noise-free synthesis), 16-bit mono at 24 kHz, 0.5 s lead-in."""
    from piper import PiperVoice, SynthesisConfig

    from miniomni.data.tts import joe_voice_path

    voice = PiperVoice.load(str(joe_voice_path()))
    chunks = list(voice.synthesize(QUESTION, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)))
    speech = soxr.resample(np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate, RATE)
    lead_in = 0.002 * np.random.default_rng(0).standard_normal(RATE // 2)
    sf.write(path, np.concatenate([lead_in, speech]).astype(np.float32), RATE, subtype="PCM_16")


@pytest.fixture(scope="module")
def talk(node_project, checkpoint_dir, tmp_path_factory):
    """One spoken turn through the SDK: its JSON lines, split into what it sent, the events, errors and summary."""
    directory = tmp_path_factory.mktemp("agents-client")
    wav = directory / "question.wav"
    piper_question(wav)
    log = directory / "serve.log"
    with serve_process(checkpoint_dir, log) as (_, port):
        done = subprocess.run(
            ["node", str(node_project / "talk.mjs"), "--url", f"ws://127.0.0.1:{port}/v1/realtime?model=mini-omni",
             "--wav", str(wav), "--api-key", "any-key", "--model", "mini-omni", "--timeout-s", "120"],
            capture_output=True, text=True, timeout=180)
    (directory / "talk.jsonl").write_text(done.stdout)
    assert done.returncode == 0, f"talk.mjs failed:\n{done.stderr}\n{done.stdout[-3000:]}\n{log.read_text()[-3000:]}"
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines and lines[-1]["kind"] == "summary", done.stdout[-3000:]
    return {
        "sent": [line["event"] for line in lines if line["kind"] == "sent"],
        "events": [line for line in lines if line["kind"] == "event"],
        "errors": [line["error"] for line in lines if line["kind"] == "error"],
        "summary": lines[-1],
    }


# The session.update events @openai/agents-realtime 0.20.0 sends on connecting (RealtimeSession defaults, an agent
# with instructions), as talk.mjs printed them.
SDK_SESSION_UPDATES = [
    {"type": "realtime", "instructions": "You are a helpful assistant.", "model": "mini-omni",
     "output_modalities": ["audio"],
     "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": None,
                         "transcription": {"model": "gpt-4o-mini-transcribe"},
                         "turn_detection": {"type": "semantic_vad"}},
               "output": {"format": {"type": "audio/pcm", "rate": 24000}, "speed": 1}}},
    {"type": "realtime", "tracing": "auto"},
]


def test_the_sdks_default_session_parses_to_semantic_vad_with_a_transcript():
    config = SessionConfig()
    for session in SDK_SESSION_UPDATES:
        config = parse_session_update(session, config, 2048)
    assert config.turn_detection.semantic and config.turn_detection.eagerness == "auto"
    assert config.turn_detection.create_response and config.turn_detection.interrupt_response
    assert config.transcription == {"model": "gpt-4o-mini-transcribe"} and config.transcribes
    assert config.output_modalities == ["audio"] and config.instructions == "You are a helpful assistant."
    assert config.max_output_tokens is None  # the SDK leaves the cap at the server's


def event(talk, kind: str) -> dict:
    found = [e for e in talk["events"] if e["type"] == kind]
    assert found, f"no {kind}; events: {talk['summary']['event_types']}"
    return found[0]


@pytest.mark.slow
def test_the_sdks_default_session_is_accepted_as_it_is_sent(talk):
    sent = talk["sent"]
    # What the fast test above parses; the agent's tool comes on top (checked below).
    assert [{k: v for k, v in event["session"].items() if k != "tools"} for event in sent] == SDK_SESSION_UPDATES
    first = sent[0]["session"]
    # What the SDK sends unless told otherwise: semantic VAD and a transcript of the user's words.
    assert first["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}
    assert first["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert first["audio"]["input"]["noise_reduction"] is None and first["audio"]["output"]["speed"] == 1
    # An update is applied whole (session.updated) or not at all (an error): each one was taken.
    updated = [e for e in talk["events"] if e["type"] == "session.updated"]
    assert len(updated) == len(sent) >= 1
    assert not [e for e in talk["errors"] if str(e.get("param") or "").startswith("session")]
    session = updated[-1]["session"]
    assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    assert session["audio"]["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"
    assert session["instructions"] == "You are a helpful assistant."  # the agent's instructions arrived


@pytest.mark.slow
def test_a_spoken_question_gets_the_users_transcript_and_a_spoken_answer(talk):
    summary = talk["summary"]
    # Semantic VAD found the turn and ended it: one committed turn, answered.
    committed = event(talk, "input_audio_buffer.committed")
    assert event(talk, "input_audio_buffer.speech_started")["item_id"] == committed["item_id"]
    assert [e["type"] for e in talk["events"]].count("input_audio_buffer.committed") == 1
    # The user's words (random weights: any text) for that turn, and the answer.
    completed = event(talk, "conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == committed["item_id"]
    assert summary["input_transcript"] == completed["transcript"]
    assert summary["audio_bytes"] > 0 and summary["audio_bytes"] % 2 == 0  # through the SDK's own audio event
    assert summary["response_status"] == "completed"
    assert summary["answer_transcript"] == event(talk, "response.output_audio_transcript.done")["transcript"]
    # The SDK's history holds both sides of the turn.
    assert [item["role"] for item in summary["history"]] == ["user", "assistant"]
    assert summary["history"][1]["transcripts"] == [summary["answer_transcript"]]


@pytest.mark.slow
def test_the_sdk_reports_no_error_and_its_history_has_the_users_words(talk):
    assert talk["errors"] == [] and not [e for e in talk["events"] if e["type"] == "error"]
    assert event(talk, "conversation.item.retrieved")["item"]["id"] == event(talk, "input_audio_buffer.committed")[
        "item_id"]
    assert talk["summary"]["history"][0]["transcripts"] == [talk["summary"]["input_transcript"]]


@pytest.mark.slow
def test_a_tool_is_carried_and_a_history_edit_deletes_the_users_turn(talk):
    """The agent's tool reaches the session as the SDK sends it; updateHistory drops the user's turn with
    conversation.item.delete, which the server confirms; no error event."""
    sent = [e["session"] for e in talk["sent"]]
    assert any(tool.get("name") == "get_weather" for update in sent for tool in update.get("tools", []))
    summary = talk["summary"]
    assert summary["deleted"] == 1 and event(talk, "conversation.item.deleted")["item_id"] == event(
        talk, "input_audio_buffer.committed")["item_id"]
    assert [item["role"] for item in summary["history_after_edit"]] == ["assistant"]
    assert talk["errors"] == [] and not [e for e in talk["events"] if e["type"] == "error"]

