"""Ray Serve: two replicas of the tiny model behind Ray's proxy, one talker each; refusal, failover, the SDK."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
import websockets

pytest.importorskip("ray", reason="Ray Serve is not installed: pip install -e '.[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

from miniomni.server.rayserve import APP_NAME, PROXY_CALLBACK, REPLICA_HEADER, ReplicaSpec, ScaleOptions, application

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_rss_mb(names: tuple[str, ...] = ("raylet", "gcs_server", "ray::", "default_worker.py", "/ray/")) -> dict:
    """Resident memory (MB) of this machine's Ray processes (raylet, GCS, workers, replicas, proxy), by process."""
    found: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="ignore")
            if not any(name in cmdline for name in names):
                continue
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            found[f"{pid} {cmdline.split()[0][-40:]}"] = rss
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def ray_serve(checkpoint_dir):
    """A local Ray cluster serving two replicas of one talker each; yields the proxy's port."""
    import ray
    from ray import serve

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = PROXY_CALLBACK  # the proxy inherits it
    checkpoint = checkpoint_dir
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": None})
        spec = ReplicaSpec(checkpoint=str(checkpoint), max_answers=1,
                           load_options={"device": "cpu", "quantize": "none"})
        serve.run(application(spec, ScaleOptions(replicas=2, replica_cpus=1, graceful_shutdown_timeout_s=8)),
                  name=APP_NAME, route_prefix="/")
        rss = process_rss_mb()
        yield port
    finally:
        print(f"\nRSS of the Ray processes, two replicas up: {sum(rss.values()):.0f} MB")
        for name, mb in sorted(rss.items(), key=lambda kv: -kv[1]):
            print(f"  {mb:6.0f} MB  {name}")
        serve.shutdown()
        ray.shutdown()


def connect(port: int):
    return websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime?model=mini-omni", proxy=None, open_timeout=20)


async def recv(ws, timeout: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=timeout))


async def until(ws, kind: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = await recv(ws, max(0.1, deadline - time.monotonic()))
        if event["type"] == kind:
            return event, seen
        seen.append(event)


async def ask(ws, question: str = "What is your name?", steps: int = 12) -> tuple[dict, list[dict]]:
    """A text question answered in text; returns (response.done, the events before it)."""
    await ws.send(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["text"], "max_output_tokens": steps}}))
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
    await ws.send(json.dumps({"type": "response.create"}))
    return await until(ws, "response.done")


async def refusal(port: int) -> tuple[str, object, float]:
    """Open a connection that should be refused: ('close', code, seconds) or ('http', status, seconds)."""
    started = time.monotonic()
    try:
        async with connect(port) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws, timeout=10)
            return "close", closed.value.rcvd.code, time.monotonic() - started
    except websockets.InvalidStatus as exc:
        return "http", exc.response.status_code, time.monotonic() - started


def test_talkers_spread_over_replicas_and_the_third_is_refused(ray_serve, omni):
    port = ray_serve
    expected = omni.generate("T1T2", text="What is your name?", max_new_tokens=12).text

    async def run():
        async with connect(port) as a, connect(port) as b:
            replicas = {a.response.headers[REPLICA_HEADER], b.response.headers[REPLICA_HEADER]}
            assert len(replicas) == 2, "two talkers landed on one replica"
            assert (await recv(a))["type"] == "session.created" and (await recv(b))["type"] == "session.created"
            (done_a, events_a), (done_b, _) = await asyncio.gather(ask(a), ask(b))
            assert done_a["response"]["status"] == done_b["response"]["status"] == "completed"
            text = "".join(e["delta"] for e in events_a if e["type"] == "response.output_text.delta")
            assert text == expected  # the replica computes what the model computes here
            kind, code, seconds = await refusal(port)
            assert (kind, code) == ("close", 1013) and seconds < 5, (kind, code, seconds)
            # The two sessions go on where they were.
            (done_a, _), (done_b, _) = await asyncio.gather(ask(a), ask(b))
            assert done_a["response"]["status"] == done_b["response"]["status"] == "completed"
            kept = a.response.headers[REPLICA_HEADER]
        # Both closed: a newcomer is served again.
        async with connect(port) as c:
            assert (await recv(c))["type"] == "session.created"
            done, _ = await ask(c)
            assert done["response"]["status"] == "completed"
        return kept

    assert asyncio.run(run())
    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["max_answers"] == 1
    assert health.headers[REPLICA_HEADER]


def test_one_freed_slot_serves_a_newcomer(ray_serve):
    port = ray_serve

    async def run():
        async with connect(port) as a:
            async with connect(port) as b:
                assert a.response.headers[REPLICA_HEADER] != b.response.headers[REPLICA_HEADER]
                assert (await refusal(port))[:2] == ("close", 1013)
                freed = b.response.headers[REPLICA_HEADER]
            await asyncio.sleep(0.3)  # the proxy learns that b's request has ended
            async with connect(port) as c:
                assert c.response.headers[REPLICA_HEADER] == freed
                assert (await recv(c))["type"] == "session.created"
                done, _ = await ask(c)
                assert done["response"]["status"] == "completed"

    asyncio.run(run())


def test_sdk_realtime_client_through_the_proxy(ray_serve, omni):
    from openai import AsyncOpenAI

    question, steps = "What is your name?", 12
    expected = omni.generate("T1T2", text=question, max_new_tokens=steps).text

    async def run():
        client = AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{ray_serve}/v1")
        async with client.realtime.connect(model="mini-omni") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "max_output_tokens": steps})
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": question}]})
            await conn.response.create()
            text = ""
            while True:
                event = await asyncio.wait_for(conn.recv(), timeout=60)
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type == "response.done":
                    return event, text

    done, text = asyncio.run(run())
    assert done.response.status == "completed" and text == expected


def test_a_stopping_replica_closes_its_talkers_and_a_reconnect_is_served(ray_serve):
    """Last: it changes the deployment (one replica is stopped and Ray starts a new one)."""
    import ray
    from ray import serve

    port = ray_serve

    async def run():
        async with connect(port) as a:
            assert (await recv(a))["type"] == "session.created"
            replica = a.response.headers[REPLICA_HEADER]
            await a.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}}))
            await a.send(json.dumps({"type": "response.create"}))  # a long spoken answer (2048 steps at most)
            await until(a, "response.created")
            handle = _replica_actor(serve, replica)
            # What the controller does to a replica it stops: a graceful shutdown request.
            stopping = handle.perform_graceful_shutdown.remote()
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                events = []
                while True:
                    events.append(await recv(a, timeout=20))
            codes = [e["error"]["code"] for e in events if e["type"] == "error"]
            failed = [e for e in events if e["type"] == "response.done"]
            assert "server_shutting_down" in codes, codes
            assert failed and failed[-1]["response"]["status"] == "failed"
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert time.monotonic() - started < 10
            ray.get(stopping, timeout=30)
            ray.kill(handle, no_restart=True)
        # The client reconnects at once: the other replica serves it.
        async with connect(port) as b:
            assert b.response.headers[REPLICA_HEADER] != replica
            assert (await recv(b))["type"] == "session.created"
            done, _ = await ask(b)
            assert done["response"]["status"] == "completed"

    asyncio.run(run())


def test_a_killed_replica_closes_its_talker_with_a_code(ray_serve):
    import ray
    from ray import serve

    port = ray_serve

    async def run():
        deadline = time.monotonic() + 60
        while True:  # the replica stopped by the test before is replaced
            running = _running_replicas(serve)
            if running == 2:
                break
            assert time.monotonic() < deadline, running
            await asyncio.sleep(0.5)
        async with connect(port) as a:
            assert (await recv(a))["type"] == "session.created"
            replica = a.response.headers[REPLICA_HEADER]
            ray.kill(_replica_actor(serve, replica), no_restart=True)  # a crash: nothing runs on it any more
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await recv(a, timeout=20)
            assert closed.value.rcvd is not None, "closed without a close frame"
            return closed.value.rcvd.code, replica

    code, replica = asyncio.run(run())
    assert code == 1011, code  # an internal error on the server's side (set by the proxy's middleware)


def _running_replicas(serve) -> int:
    """How many replicas of the deployment run."""
    deployment = serve.status().applications[APP_NAME].deployments["MiniOmni"]
    return deployment.replica_states.get("RUNNING", 0)


DEPLOYMENT_TAG = "SERVE_REPLICA::miniomni#MiniOmni#"


def _replica_actor(serve, unique_id: str):
    """The actor handle of the replica whose id the header gave."""
    import ray

    return ray.get_actor(f"{DEPLOYMENT_TAG}{unique_id}", namespace="serve")


def _through_proxy_middleware(app, extensions: dict | None = None) -> list[dict]:
    """What a WebSocket client's server side is asked to send when ``app`` (standing for Ray's proxy) runs."""
    from miniomni.server.rayserve import ProxyWebSockets

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    extensions = {"websocket.http.response": {}} if extensions is None else extensions
    scope = {"type": "websocket", "extensions": extensions}
    asyncio.run(ProxyWebSockets(app)(scope, receive, send))
    return sent


def test_proxy_middleware_turns_a_backpressure_answer_into_a_503_handshake():
    async def refusing(scope, receive, send):  # what Ray's proxy sends for a request it drops
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    sent = _through_proxy_middleware(refusing)
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert sent[0]["status"] == 503
    # A server without the denial-response extension closes with 1013 instead.
    assert _through_proxy_middleware(refusing, extensions={}) == [
        {"type": "websocket.close", "code": 1013, "reason": "the server is full"}]


def test_proxy_middleware_closes_an_orphaned_socket_with_1011_and_leaves_others_alone():
    async def orphaning(scope, receive, send):  # accepted, then the replica died
        await send({"type": "websocket.accept"})

    async def closing(scope, receive, send):
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1001})

    assert _through_proxy_middleware(orphaning)[-1]["code"] == 1011
    assert _through_proxy_middleware(closing) == [{"type": "websocket.accept"},
                                                  {"type": "websocket.close", "code": 1001}]
