"""@openai/agents-realtime in a real browser, over WebRTC, against `miniomni serve` with an ek_ client secret.

Headless Chromium's fake microphone speaks a WAV file (a Piper question, then silence). The page
(`tests/js/browser_talk.html`, served from another origin than the server, as an app's page would be) loads the
SDK's own ESM browser build from the pinned npm package and runs a RealtimeSession with the WebRTC transport:
the SDK's default session (semantic VAD, a transcript of the user's words), only the URL and the key given. The
key is an ek_ client secret the test (standing for the app's backend) made with the server's API key; the page
never sees the server's key. The page must hear answer audio on the track and get both transcripts.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import serve_process
from test_agents_client import JS, node_project  # noqa: F401 - the fixture: tests/js with its pinned packages

pytestmark = pytest.mark.slow  # a real browser and a real server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
SDK_BUNDLE = JS / "node_modules" / "@openai" / "agents-realtime" / "dist" / "bundle"
QUESTION = "What is the weather like in Paris today?"
KEY_SESSION = {"type": "realtime", "instructions": "Set by the client secret.", "max_output_tokens": 48}


def piper_question(path: Path) -> None:
    """The question by the Piper joe voice at 48 kHz mono 16-bit (what the fake microphone reads best), with
    0.5 s of faint noise before it and 3 s of silence after it."""
    from piper import PiperVoice, SynthesisConfig

    from miniomni.data.tts import joe_voice_path

    voice = PiperVoice.load(str(joe_voice_path()))
    chunks = list(voice.synthesize(QUESTION, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)))
    speech = soxr.resample(np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate, 48000)
    lead_in = 0.002 * np.random.default_rng(0).standard_normal(24000)
    sf.write(path, np.concatenate([lead_in, speech, np.zeros(3 * 48000)]).astype(np.float32), 48000,
             subtype="PCM_16")


@contextlib.contextmanager
def static_site(directory: Path):
    """A plain HTTP server for ``directory`` on 127.0.0.1 (another origin than the Realtime server); its URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                          ".js": "text/javascript"}

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser_talk(node_project, checkpoint_dir, tmp_path_factory):  # noqa: F811 - node_project is the fixture
    """One spoken turn through the SDK in Chromium: the page's window.result."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Chromium ({CHROMIUM}; Debian's chromium package) to run the SDK in a browser")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    directory = tmp_path_factory.mktemp("browser-sdk")
    site = directory / "site"
    site.mkdir()
    for name in ("browser_talk.html", "browser_talk.mjs"):
        (site / name).symlink_to(JS / name)
    (site / "sdk").symlink_to(SDK_BUNDLE, target_is_directory=True)
    wav = directory / "question.wav"
    piper_question(wav)
    keyfile = directory / "api-key"
    keyfile.write_text("server-key\n")
    with static_site(site) as origin, \
            serve_process(checkpoint_dir, directory / "serve.log", "--api-key-file", str(keyfile),
                          "--cors-origin", origin, api_key="server-key") as (_, port):
        server = f"http://127.0.0.1:{port}"
        made = httpx.post(f"{server}/v1/realtime/client_secrets", headers={"Authorization": "Bearer server-key"},
                          json={"expires_after": {"anchor": "created_at", "seconds": 300}, "session": KEY_SESSION},
                          timeout=30)
        assert made.status_code == 200, made.text
        key = made.json()["value"]
        query = urlencode({"key": key, "url": f"{server}/v1/realtime/calls", "timeout_s": "150"})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop",
            ])
            try:
                page = browser.new_page()
                console: list[str] = []
                page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
                page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
                page.goto(f"{origin}/browser_talk.html?{query}")
                try:
                    page.wait_for_function("() => window.result", timeout=200_000, polling=500)
                except PlaywrightTimeout:
                    log = (directory / "serve.log").read_text()[-3000:]
                    raise AssertionError(f"no result from the page; console: {console[-20:]}\nserver: {log}") from None
                result = page.evaluate("window.result")
            finally:
                browser.close()
    result["console"] = console
    result["key"] = key
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "browser-sdk.json").write_text(json.dumps(result, indent=1))
    return result


def first(result: dict, kind: str) -> dict:
    found = [e for e in result["events"] if e["type"] == kind]
    assert found, f"no {kind}; events: {[e['type'] for e in result['events']]}; console: {result['console'][-10:]}"
    return found[0]


def test_the_sdk_connects_over_webrtc_with_the_client_secret(browser_talk):
    assert browser_talk["connect_error"] is None, browser_talk["console"][-10:]
    assert browser_talk["errors"] == [] and not [e for e in browser_talk["events"] if e["type"] == "error"]
    assert browser_talk["call_id"] and browser_talk["call_id"].startswith("rtc_")  # read from Location (CORS)
    created = browser_talk["events"][0]
    assert created["type"] == "session.created"
    assert created["session"]["instructions"] == "Set by the client secret."  # the key's configuration
    assert created["session"]["max_output_tokens"] == 48
    updated = first(browser_talk, "session.updated")["session"]
    assert updated["instructions"] == "You are a helpful assistant."  # then the SDK's own update
    assert updated["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"


def test_the_page_hears_the_answer_on_the_track(browser_talk):
    started = first(browser_talk, "output_audio_buffer.started")
    done = first(browser_talk, "response.done")
    assert done["response"]["status"] == "completed" and started["response_id"] == done["response"]["id"]
    stopped = first(browser_talk, "output_audio_buffer.stopped")
    assert started["at_ms"] <= stopped["at_ms"]
    assert "response.output_audio.delta" not in [e["type"] for e in browser_talk["events"]]  # audio is on the track
    track = browser_talk["track"]
    assert track["samples"] > 48000 and track["energy"] > 1e-4, track  # not only the idle track's silence


def test_both_transcripts_arrive(browser_talk):
    committed = first(browser_talk, "input_audio_buffer.committed")
    assert first(browser_talk, "input_audio_buffer.speech_started")["item_id"] == committed["item_id"]
    heard = first(browser_talk, "conversation.item.input_audio_transcription.completed")
    assert heard["item_id"] == committed["item_id"] and heard["transcript"].strip()
    answer = first(browser_talk, "response.output_audio_transcript.done")["transcript"]
    assert answer.strip()
    history = browser_talk["history"]
    assert [item["role"] for item in history] == ["user", "assistant"]
    assert history[0]["transcripts"] == [heard["transcript"]] and history[1]["transcripts"] == [answer]
