"""Short-lived ek_ keys: POST /v1/realtime/client_secrets, and the keys opening Realtime sessions (WebSocket and
WebRTC) with the configuration they were made with; expired, unknown and misplaced keys refused, saying why."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from conftest import engine_fixture, serving
from openai import OpenAI
from starlette.datastructures import Headers

from miniomni.server.app import create_app
from miniomni.server.realtime.ephemeral import ClientSecrets, KeyRefused, presented_client_secret
from miniomni.server.realtime.protocol import ClientError
from miniomni.server.settings import ServerSettings

KEY = "sekret"
SESSION = {"type": "realtime", "instructions": "Answer briefly.", "max_output_tokens": 48,
           "audio": {"input": {"turn_detection": None, "transcription": {"model": "mini-omni"}}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------- the key store alone


def test_keys_are_random_bound_to_their_session_and_expire():
    clock = Clock()
    store = ClientSecrets(clock=clock)
    made = store.create({"expires_after": {"anchor": "created_at", "seconds": 60}, "session": SESSION},
                        ServerSettings())
    other = store.create(None, ServerSettings())
    assert made["value"].startswith("ek_") and len(made["value"]) == 3 + 48 and made["value"] != other["value"]
    assert made["expires_at"] == 1_000_060 and other["expires_at"] == 1_000_600  # 600 s by default
    shown = made["session"]
    assert shown["object"] == "realtime.session" and shown["instructions"] == "Answer briefly."
    assert shown["max_output_tokens"] == 48 and shown["audio"]["input"]["turn_detection"] is None
    grant = store.check(made["value"])
    assert grant.session == SESSION and grant.expires_at == 1_000_060
    clock.now += 59
    assert store.check(made["value"]) is grant  # usable any number of times until it expires
    clock.now += 1
    with pytest.raises(KeyRefused, match="expired at 1000060"):
        store.check(made["value"])
    assert len(store.live) == 1  # purged; the other one lives
    with pytest.raises(KeyRefused, match="unknown client secret ek_"):
        store.check("ek_" + "0" * 48)
    assert made["value"][7:] not in str(pytest.raises(KeyRefused, store.check, made["value"]).value)  # never echoed


@pytest.mark.parametrize(("body", "words"), [
    ([], "JSON object"),
    ({"expires_after": {"seconds": 5}}, "from 10 to 7200"),
    ({"expires_after": {"seconds": 7201}}, "from 10 to 7200"),
    ({"expires_after": {"seconds": True}}, "from 10 to 7200"),
    ({"expires_after": {"anchor": "now", "seconds": 60}}, "created_at"),
    ({"expires_after": 60}, "must be an object"),
    ({"session": "realtime"}, "session must be an object"),
    ({"session": {"type": "video"}}, "session.type"),
    ({"session": {"audio": {"input": {"turn_detection": {"type": "magic"}}}}}, "turn_detection.type"),
    ({"session": {"model": 7}}, "session.model"),
])
def test_bad_bodies_say_what_is_wrong(body, words):
    with pytest.raises(ClientError, match=words):
        ClientSecrets().create(body, ServerSettings())


def test_live_keys_are_capped_and_expired_ones_make_room():
    clock = Clock()
    store = ClientSecrets(max_live=3, clock=clock)
    for seconds in (10, 20, 30):
        store.create({"expires_after": {"seconds": seconds}}, ServerSettings())
    with pytest.raises(OverflowError, match="3 client secrets are live"):
        store.create({}, ServerSettings())
    clock.now += 10
    store.create({}, ServerSettings())  # the first has expired: room for one
    assert len(store.live) == 3 and len(store.expiry) == 3 and len(store.expired) == 1


def test_where_a_key_is_presented():
    assert presented_client_secret(Headers({"authorization": "Bearer ek_abc"})) == "ek_abc"
    assert presented_client_secret(Headers({"authorization": "Bearer sk-abc"})) is None
    assert presented_client_secret(Headers({}), ["realtime", "openai-insecure-api-key.ek_xyz"]) == "ek_xyz"
    assert presented_client_secret(Headers({}), ["openai-insecure-api-key.sekret"]) is None


# ---------------------------------------------------------------------- over HTTP, WebSocket and WebRTC


engine = engine_fixture(2)


@pytest.fixture(scope="module")
def keyed(engine):
    app = create_app(engine, ServerSettings(api_key=KEY))
    with serving(app) as port:
        yield port, app.state.client_secrets


def make_key(port: int, body: dict | None = None, key: str = KEY) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/realtime/client_secrets", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_the_openai_sdk_makes_a_key(keyed):
    port, _ = keyed
    client = OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1")
    made = client.realtime.client_secrets.create(expires_after={"anchor": "created_at", "seconds": 120},
                                                 session=SESSION)
    assert made.value.startswith("ek_") and made.session.instructions == "Answer briefly."
    assert made.session.type == "realtime" and made.session.max_output_tokens == 48


def test_making_keys_needs_the_server_key(keyed):
    port, _ = keyed
    assert httpx.post(f"http://127.0.0.1:{port}/v1/realtime/client_secrets").status_code == 401
    assert make_key(port, key="wrong").status_code == 401
    made = make_key(port).json()
    assert make_key(port, key=made["value"]).status_code == 401  # a key cannot make keys
    bad = make_key(port, {"expires_after": {"seconds": 1}})
    assert bad.status_code == 400 and "from 10 to 7200" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "expires_after.seconds"
    # an ek_ key opens Realtime sessions only
    chat = httpx.post(f"http://127.0.0.1:{port}/chat", json={"audio": ""},
                      headers={"Authorization": f"Bearer {made['value']}"})
    assert chat.status_code == 401
    health = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Authorization": f"Bearer {made['value']}"})
    assert health.status_code == 401


def test_a_key_opens_a_websocket_session_with_its_configuration(keyed):
    port, store = keyed
    made = make_key(port, {"session": {**SESSION, "model": "mini-omni-ek"}}).json()
    url = f"ws://127.0.0.1:{port}/v1/realtime"

    async def first_event(**kwargs) -> dict:
        async with websockets.connect(url, proxy=None, **kwargs) as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    async def refusal(**kwargs) -> tuple[int, str]:
        async with websockets.connect(url, proxy=None, **kwargs) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code, closed.value.rcvd.reason

    async def run() -> None:
        for kwargs in ({"subprotocols": ["realtime", f"openai-insecure-api-key.{made['value']}"]},
                       {"additional_headers": {"Authorization": f"Bearer {made['value']}"}}):
            created = await first_event(**kwargs)
            assert created["type"] == "session.created", created
            session = created["session"]
            assert session["instructions"] == "Answer briefly." and session["max_output_tokens"] == 48
            assert session["audio"]["input"]["turn_detection"] is None and session["model"] == "mini-omni-ek"
            assert session["audio"]["input"]["transcription"] == {"model": "mini-omni"}
        code, reason = await refusal(subprotocols=["realtime", "openai-insecure-api-key.ek_nope"])
        assert code == 1008 and "unknown client secret" in reason
        short = make_key(port, {"expires_after": {"seconds": 10}}).json()
        store.clock = lambda: short["expires_at"] + 1.0  # ten seconds later
        try:
            code, reason = await refusal(subprotocols=["realtime", f"openai-insecure-api-key.{short['value']}"])
        finally:
            store.clock = __import__("time").time
        assert code == 1008 and "expired" in reason
        # the server's own key still works beside the keys
        assert (await first_event(subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]))["type"] == \
            "session.created"

    asyncio.run(run())


def test_a_key_opens_a_webrtc_call_with_its_configuration(keyed):
    aiortc = pytest.importorskip("aiortc", reason="the WebRTC transport needs aiortc")
    port, store = keyed
    made = make_key(port, {"session": SESSION}).json()

    async def run() -> tuple[dict, list[int], list[str]]:
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel("oai-events")
        events: asyncio.Queue = asyncio.Queue()
        channel.on("message", lambda message: events.put_nowait(json.loads(message)))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        statuses, messages = [], []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for key in ("ek_" + "1" * 48, "wrong"):
                refused = await http.post("/v1/realtime/calls", content=offer,
                                          headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {key}"})
                statuses.append(refused.status_code)
                messages.append(refused.json()["error"]["message"])
            reply = await http.post("/v1/realtime/calls", content=offer,
                                    headers={"Content-Type": "application/sdp",
                                             "Authorization": f"Bearer {made['value']}"})
            assert reply.status_code == 201, reply.text
            await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=reply.text, type="answer"))
            created = await asyncio.wait_for(events.get(), 30)
            await http.delete(reply.headers["location"], headers={"Authorization": f"Bearer {KEY}"})
        await pc.close()
        return created, statuses, messages

    created, statuses, messages = asyncio.run(run())
    assert statuses == [401, 401]
    assert "unknown client secret" in messages[0] and "API key" in messages[1]
    assert created["type"] == "session.created", created
    assert created["session"]["instructions"] == "Answer briefly."
    assert created["session"]["audio"]["input"]["turn_detection"] is None
    assert created["session"]["max_output_tokens"] == 48
