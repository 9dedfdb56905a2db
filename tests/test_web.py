"""The web page in a real headless Chromium: fake microphone speaks a WAV, the page shows the answer."""

from __future__ import annotations

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


def spoken_question(path: Path) -> None:
    """A spoken question (espeak-ng) followed by silence, at 48 kHz as Chromium's fake microphone wants."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(raw), "What is your name?"], check=True)
    speech, rate = sf.read(raw, dtype="float32")
    import soxr

    speech = soxr.resample(speech, rate, 48000)
    silence = np.zeros(int(48000 * 2.0), dtype=np.float32)
    sf.write(path, np.concatenate([silence[:9600], speech, silence]), 48000, subtype="PCM_16")


@pytest.fixture(scope="module")
def page_server(omni):
    engine = Engine(omni, max_sessions=2)
    with serving(create_app(engine, ServerSettings())) as port:
        yield f"http://localhost:{port}", engine
    engine.close()


def test_page_speaks_and_shows_the_answer(page_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, engine = page_server
    wav = tmp_path / "question.wav"
    spoken_question(wav)
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(url + "/")
            assert page.title() == "miniomni · voice chat"
            page.click("#connect")
            page.wait_for_selector(".turn .latency:has-text('first audio')", timeout=90_000)
            page.wait_for_function(
                "() => document.querySelector('.turn .text')"
                " && document.querySelector('.turn .text').textContent.length > 0",
                timeout=90_000,
            )
            # Both sides of the conversation: the user's words (the model's own transcript) beside the answer.
            page.wait_for_function(
                "() => document.querySelector('.turn.user .text')"
                " && !['…', '(not transcribed)'].includes(document.querySelector('.turn.user .text').textContent)",
                timeout=90_000,
            )
            heard = page.inner_text(".turn.user .text")
            transcript = page.inner_text(".turn:not(.user) .text")
            latency = page.inner_text(".turn:not(.user) .latency")
            page.screenshot(path=str(OUTPUT / "web-page.png"), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {OUTPUT / 'web-page.png'}; heard: {heard!r}; transcript: {transcript!r}; {latency}")
    assert transcript.strip() and heard.strip()
    assert latency.startswith("first audio") and int(latency.split()[2]) >= 0
    assert engine.stats.answers_started >= 1 and engine.stats.steps > 8  # the server really answered the page
