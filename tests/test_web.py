"""The web page in a real headless Chromium: a fake microphone speaks a WAV, the page shows the conversation.

The server has an API key: the page asks for it once, gets a short-lived ek_ key from client_secrets with it and
talks WebRTC with that key; with WebRTC failing, it falls back to the WebSocket (the same ek_ key)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import serving

from miniomni.server.app import create_app
from miniomni.server.engine import Engine
from miniomni.server.settings import ServerSettings

pytestmark = pytest.mark.slow  # a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


KEY = "sekret"


def spoken_question(path: Path) -> None:
    """A spoken question (espeak-ng) between silences, at 48 kHz as Chromium's fake microphone wants: 2.5 s
    before it (the page connects meanwhile; the file starts when the microphone opens) and 3 s after it."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(raw), "What is your name?"], check=True)
    speech, rate = sf.read(raw, dtype="float32")
    import soxr

    speech = soxr.resample(speech, rate, 48000)
    sf.write(path, np.concatenate([np.zeros(int(48000 * 2.5)), speech, np.zeros(48000 * 3)]).astype(np.float32),
             48000, subtype="PCM_16")


@pytest.fixture(scope="module")
def page_server(omni):
    engine = Engine(omni, max_answers=4)  # a closed browser's call may answer on until its peer times out
    with serving(create_app(engine, ServerSettings(api_key=KEY))) as port:
        yield f"http://localhost:{port}", engine
    engine.close()


@contextlib.contextmanager
def browser_page(wav: Path):
    """A page of headless Chromium whose microphone speaks ``wav`` once; its console and requests recorded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            page = browser.new_page()
            page.console = []  # type: ignore[attr-defined]
            page.requests = []  # type: ignore[attr-defined]
            page.on("console", lambda message: page.console.append(message.text))
            page.on("request", lambda request: page.requests.append(
                (request.method, request.url, request.headers.get("authorization", ""))))
            yield page
        finally:
            browser.close()


def talk(page, url: str, transport: str) -> dict:
    """Open the page, connect over ``transport`` with the server's key, wait for a whole spoken turn."""
    page.goto(url + "/")
    assert page.title() == "miniomni · voice chat"
    page.select_option("#transport", transport)
    page.fill("#apikey", KEY)
    page.click("#connect")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:  # both sides of the conversation as bubbles, the answer with its voice-to-voice time
        page.wait_for_selector(".bubble.assistant .latency:has-text('voice-to-voice')", timeout=90_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.bubble.user:not(.pending) .text')]"
            ".some((e) => !e.textContent.startsWith('(no'))", timeout=90_000)
        page.wait_for_function("() => document.querySelector('.bubble.assistant:not(.pending) .text')",
                               timeout=90_000)
    except PlaywrightTimeout:
        raise AssertionError(f"status: {page.inner_text('#status')!r}; conversation: "
                             f"{page.inner_html('#conversation')[:2000]}; console: {page.console[-10:]}") from None
    return {
        "heard": page.inner_text(".bubble.user:not(.pending) .text"),
        "answer": page.inner_text(".bubble.assistant:not(.pending) .text"),
        "latency": page.inner_text(".bubble.assistant .latency"),
        "summary": page.inner_text("#latency-summary"),
        "used": page.inner_text("#transport-used"),
        "seen": page.evaluate("window.miniomni"),
    }


def test_page_asks_for_the_key_then_talks_webrtc(page_server, tmp_path):
    url, engine = page_server
    wav = tmp_path / "question.wav"
    spoken_question(wav)
    OUTPUT.mkdir(exist_ok=True)
    with browser_page(wav) as page:
        page.goto(url + "/")
        page.click("#connect")  # no key typed: the page asks for it
        page.wait_for_selector("#status:has-text('needs its API key')", timeout=30_000)
        shown = talk(page, url, "webrtc")
        page.screenshot(path=str(OUTPUT / "web-page.png"), full_page=True)
        requests = list(page.requests)
        console = list(page.console)
    print(f"screenshot: {OUTPUT / 'web-page.png'}; {shown}")
    assert shown["used"] == "over WebRTC" and shown["seen"]["transport"] == "WebRTC", console[-10:]
    assert shown["heard"].strip() and shown["answer"].strip()
    assert shown["latency"].startswith("voice-to-voice") and 0 <= int(shown["latency"].split()[1]) < 30_000
    assert shown["summary"].startswith("voice-to-voice: last")
    assert shown["seen"]["peakLevel"] > 0.3  # the meter moved with the voice
    assert {"user", "assistant"} <= set(shown["seen"]["speakers"])  # who is speaking, both sides
    # The server's key only asked for the short-lived one; the call itself went with the ek_ key.
    calls = [r for r in requests if r[1].endswith("/v1/realtime/calls")]
    assert calls and all(r[0] == "POST" and r[2].startswith("Bearer ek_") for r in calls)
    assert [r[1] for r in requests if r[2] == f"Bearer {KEY}"] == [url + "/v1/realtime/client_secrets"]
    assert engine.stats.answers_started >= 1 and engine.stats.steps > 8  # the server really answered the page


def test_page_falls_back_to_the_websocket(page_server, tmp_path):
    url, engine = page_server
    wav = tmp_path / "question.wav"
    spoken_question(wav)
    with browser_page(wav) as page:
        page.route("**/v1/realtime/calls", lambda route: route.abort())  # as if WebRTC could not get through
        shown = talk(page, url, "auto")
    print(shown)
    assert shown["seen"]["transport"] == "WebSocket" and shown["seen"]["fallback"], shown
    assert shown["used"].startswith("over WebSocket (WebRTC failed")
    assert shown["heard"].strip() and shown["answer"].strip()
    assert shown["latency"].startswith("voice-to-voice") and 0 <= int(shown["latency"].split()[1]) < 30_000
    assert shown["seen"]["peakLevel"] > 0.3 and {"user", "assistant"} <= set(shown["seen"]["speakers"])
