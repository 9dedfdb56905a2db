"""HTTP serving on loopback with real clients: /chat streaming, bad input, busy, API key, concurrency."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import engine_fixture, serve_process, serving, speech_like, wait_idle
from fastapi.testclient import TestClient

from miniomni.audio import float_to_pcm16
from miniomni.server.app import create_app
from miniomni.server.chat import PCM_MEDIA_TYPE
from miniomni.server.engine import AnswerRequest
from miniomni.server.settings import ServerSettings
from miniomni.streaming import AudioChunk

MAX_ANSWERS = 3


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, speech_like(seconds, sample_rate=rate), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def chat_body(seconds: float = 1.5, **extra) -> dict:
    return {"audio": base64.b64encode(wav_bytes(seconds)).decode(), **extra}


engine = engine_fixture(MAX_ANSWERS)


@pytest.fixture(scope="module")
def server(engine):
    with serving(create_app(engine, ServerSettings(max_audio_seconds=30))) as port:
        yield f"http://127.0.0.1:{port}"


def expected_pcm(omni, seconds=1.5, max_tokens=20, stride=4) -> bytes:
    events = omni.stream(audio=wav_bytes(seconds), max_new_tokens=max_tokens, max_chunk=stride)
    return b"".join(float_to_pcm16(e.audio) for e in events if isinstance(e, AudioChunk))


def test_chat_streams_raw_pcm_equal_to_a_local_stream(server, omni, engine):
    chunks = []
    with httpx.stream("POST", f"{server}/chat", json=chat_body(max_tokens=20), timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == PCM_MEDIA_TYPE
        for chunk in response.iter_bytes():
            chunks.append(chunk)
    pcm = b"".join(chunks)
    assert len(pcm) == (20 - 7) * 2048 * 2
    assert pcm == expected_pcm(omni)
    assert wait_idle(engine)


def test_chat_wav_format_has_a_streaming_header(server):
    response = httpx.post(f"{server}/chat?format=wav", json=chat_body(max_tokens=12), timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    data = response.content
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert len(data) == 44 + (12 - 7) * 2048 * 2
    samples = np.frombuffer(data[44:], dtype="<i2")
    assert np.abs(samples).max() > 0


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"not json", 400, "JSON"),
        (b'{"stream_stride": 4}', 400, "audio"),
        (b'{"audio": "%%%not base64%%%"}', 400, "base64"),
        (b'{"audio": "' + base64.b64encode(b"hello, not audio" * 20) + b'"}', 400, "could not"),
        (b'{"audio": ""}', 400, "empty"),
        (b'{"audio": "' + base64.b64encode(wav_bytes(1.0)) + b'", "stream_stride": 0}', 400, "stream_stride"),
        (b'{"audio": "' + base64.b64encode(wav_bytes(1.0)) + b'", "max_tokens": 99999}', 400, "max_tokens"),
        (b'{"audio": "' + base64.b64encode(wav_bytes(31.0)) + b'"}', 413, "31.0 s"),
    ],
)
def test_bad_chat_input_is_a_clear_error_and_harmless(server, engine, body, status, words):
    response = httpx.post(f"{server}/chat", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert engine.active_answers == 0


def test_busy_server_answers_503_and_frees_slots(server, engine):
    sessions = [engine.open(AnswerRequest(task="T1T2", text="hold the line", max_new_tokens=1500), lambda e: None)
                for _ in range(MAX_ANSWERS)]
    try:
        response = httpx.post(f"{server}/chat", json=chat_body(), timeout=60)
        assert response.status_code == 503
        assert "busy" in response.json()["error"]["message"]
    finally:
        for session in sessions:
            session.cancel()
    assert wait_idle(engine)
    assert sorted(engine.free_slots) == list(range(MAX_ANSWERS))
    assert httpx.post(f"{server}/chat", json=chat_body(max_tokens=10), timeout=60).status_code == 200


def test_concurrent_sessions_match_alone(server, omni, engine):
    alone = expected_pcm(omni, max_tokens=30)
    results = [None] * MAX_ANSWERS

    def client(index):
        results[index] = httpx.post(f"{server}/chat", json=chat_body(max_tokens=30), timeout=120).content

    threads = [threading.Thread(target=client, args=(i,)) for i in range(MAX_ANSWERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result == alone for result in results)
    assert wait_idle(engine)


def test_client_that_disconnects_stops_its_answer(server, engine):
    with httpx.stream("POST", f"{server}/chat", json=chat_body(max_tokens=1500), timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    assert wait_idle(engine, timeout=10)  # cancelled within a step, not after 1500 of them


def test_health_and_metrics(server):
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["max_answers"] == MAX_ANSWERS
    text = httpx.get(f"{server}/metrics").text
    assert "# TYPE miniomni_active_answers gauge" in text
    steps = [line for line in text.splitlines() if line.startswith("miniomni_decode_steps_total ")]
    assert steps and float(steps[0].split()[1]) > 0
    assert 'miniomni_answers_total{result="finished"}' in text


def test_api_key_is_required_everywhere(engine):
    app = create_app(engine, ServerSettings(api_key="sekret"))
    with TestClient(app) as client:
        for path in ("/healthz", "/metrics", "/docs"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert client.post("/chat", json=chat_body()).status_code == 401
        assert client.get("/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # The page holds no data and a browser cannot send the header when loading it;
        # it sends the key the user types with its WebSocket.
        assert client.get("/").status_code == 200 and "voice chat" in client.get("/").text
        assert client.get("/static/app.js").status_code == 200


def test_cors_is_closed_by_default_and_configurable(engine):
    with TestClient(create_app(engine)) as client:
        response = client.get("/healthz", headers={"Origin": "https://example.org"})
        assert "access-control-allow-origin" not in response.headers
    with TestClient(create_app(engine, ServerSettings(cors_origins=["https://example.org"]))) as client:
        response = client.get("/healthz", headers={"Origin": "https://example.org"})
        assert response.headers["access-control-allow-origin"] == "https://example.org"


def self_signed(directory):
    """A certificate for 127.0.0.1/localhost, made with the cryptography package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def test_https_with_the_ssl_options(engine, tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    import ssl

    context = ssl.create_default_context(cafile=str(certfile))
    with serving(create_app(engine), ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as port:
        assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=context).json()["status"] == "ok"
        assert "voice chat" in httpx.get(f"https://localhost:{port}/", verify=context).text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/healthz")  # untrusted by default, as a browser would say


def test_serve_cli_refuses_half_ssl_options(capsys, checkpoint_dir):
    from miniomni.cli import main

    assert main(["serve", "--checkpoint", str(checkpoint_dir), "--ssl-certfile", "cert.pem"]) == 2
    assert "both --ssl-certfile and --ssl-keyfile" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_warms_up_reports_its_speed_serves_and_stops_on_sigterm(checkpoint_dir, tmp_path):
    """The real command in its own process: compute on its main thread, HTTP on another."""
    import signal
    import time

    log = tmp_path / "serve.log"
    with serve_process(checkpoint_dir, log, "--max-answers", "1") as (process, port):
        pcm = httpx.post(f"http://127.0.0.1:{port}/chat", json=chat_body(max_tokens=12), timeout=60).content
        assert len(pcm) == (12 - 7) * 2048 * 2
        for _ in range(100):  # the engine counts the answer just after its last event
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if 'miniomni_answers_total{result="finished"} 0' not in metrics:
                break
            time.sleep(0.05)
        assert 'miniomni_answers_total{result="finished"} 1' in metrics  # the warm-up is not counted
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert "a frame of speech (85 ms) costs" in log.read_text()  # the start-up measurement, in plain words
