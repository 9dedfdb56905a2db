"""The Realtime session without any transport: JSON text in, JSON text out, closes as calls."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
from conftest import engine_fixture, speech_like, wait_idle

from miniomni.server.realtime.protocol import pcm16_to_float
from miniomni.server.realtime.session import RealtimeSession
from miniomni.server.settings import ServerSettings

RATE = 24000


class Recorder:
    """An Output that keeps what the session says."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.arrived = asyncio.Event()

    def send_text(self, data: str) -> None:
        self.events.append(json.loads(data))
        self.arrived.set()

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def wait_for(self, kind: str, timeout: float = 60.0) -> dict:
        async def seen() -> dict:
            while True:
                for event in self.events:
                    if event["type"] == kind:
                        return event
                self.arrived.clear()
                await self.arrived.wait()
        try:
            return await asyncio.wait_for(seen(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {kind} within {timeout} s; the session said {self.events}") from None


engine = engine_fixture(2)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_spoken_question_is_answered_through_the_session_alone(engine, omni):
    pcm = (np.clip(speech_like(1.0, sample_rate=RATE), -1, 1) * 32767).astype("<i2").tobytes()

    async def talk() -> Recorder:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
        session.start()
        await session.receive(json.dumps({"type": "session.update", "session": {
            "max_output_tokens": 12, "audio": {"input": {"turn_detection": None}}}}))
        audio = base64.b64encode(pcm).decode()
        await session.receive(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await session.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        await session.receive(json.dumps({"type": "response.create"}))
        await out.wait_for("response.done")
        session.close()
        return out

    out = run(talk())
    types = out.types()
    assert types[:2] == ["session.created", "session.updated"]
    assert "input_audio_buffer.committed" in types and "response.created" in types
    audio = b"".join(base64.b64decode(e["delta"]) for e in out.events if e["type"] == "response.output_audio.delta")
    expected = omni.generate("A1A2-batch", audio=pcm16_to_float(pcm), sample_rate=RATE, max_new_tokens=12)
    assert audio and len(audio) == 2 * len(expected.audio)
    done = next(e for e in out.events if e["type"] == "response.done")
    assert done["response"]["status"] == "completed"
    assert out.closed is None
    assert len({e["event_id"] for e in out.events}) == len(out.events)


def test_bad_events_are_errors_and_a_flood_closes_the_session(engine):
    async def talk() -> tuple[Recorder, RealtimeSession]:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(max_events_per_second=5), "mini-omni", out)
        session.start()
        await session.receive("{not json")
        await session.receive(None)  # a binary frame
        await session.receive(json.dumps({"type": "no.such.event"}))
        for _ in range(40):
            await session.receive(json.dumps({"type": "input_audio_buffer.clear"}))
        return out, session

    out, session = run(talk())
    codes = [e["error"]["code"] for e in out.events if e["type"] == "error"]
    assert codes[:3] == ["invalid_json", "binary_frame", "unknown_event_type"]
    assert "rate_limit_exceeded" in codes
    assert out.closed is not None and out.closed[0] == 1008
    session.close()
    count = len(out.events)
    session.send({"type": "input_audio_buffer.cleared"})
    assert len(out.events) == count  # a closed session says nothing more


def test_shutting_down_fails_the_running_answer_and_closes_with_1001(engine):
    async def talk() -> Recorder:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
        session.start()
        await session.receive(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}}))
        await session.receive(json.dumps({"type": "response.create", "response": {"max_output_tokens": 400}}))
        await out.wait_for("response.output_audio.delta")
        session.shut_down()
        session.close()
        return out

    out = run(talk())
    errors = [e for e in out.events if e["type"] == "error"]
    assert errors and errors[0]["error"]["code"] == "server_shutting_down"
    done = next(e for e in out.events if e["type"] == "response.done")
    assert done["response"]["status"] == "failed"
    assert out.closed == (1001, "the server is shutting down")


def test_items_are_deleted_but_never_while_they_are_answered(engine):
    pcm = (np.clip(speech_like(1.0, sample_rate=RATE), -1, 1) * 32767).astype("<i2").tobytes()

    async def talk() -> Recorder:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
        session.start()
        send = session.receive
        await send(json.dumps({"type": "session.update", "session": {
            "max_output_tokens": 400, "audio": {"input": {"turn_detection": None}}}}))
        await send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
        await send(json.dumps({"type": "input_audio_buffer.commit"}))
        user = (await out.wait_for("input_audio_buffer.committed"))["item_id"]
        await send(json.dumps({"type": "response.create"}))
        answer = (await out.wait_for("response.created"))["response"]["id"]
        await send(json.dumps({"type": "conversation.item.delete", "item_id": user}))  # being answered: refused
        await out.wait_for("error")
        await send(json.dumps({"type": "response.cancel", "response_id": answer}))
        await out.wait_for("response.done")
        await send(json.dumps({"type": "conversation.item.delete", "item_id": user}))
        await out.wait_for("conversation.item.deleted")
        await send(json.dumps({"type": "conversation.item.retrieve", "item_id": user}))
        await send(json.dumps({"type": "conversation.item.delete", "item_id": "item_nope"}))
        await send(json.dumps({"type": "response.create"}))  # the deleted turn is not answered again
        await asyncio.sleep(0.2)
        session.close()
        return out

    out = run(talk())
    codes = [e["error"]["code"] for e in out.events if e["type"] == "error"]
    assert codes == ["item_delete_in_progress", "item_retrieve_invalid_item_id", "item_delete_invalid_item_id",
                     "response_no_input"], codes
    deleted = [e for e in out.events if e["type"] == "conversation.item.deleted"]
    committed = next(e for e in out.events if e["type"] == "input_audio_buffer.committed")
    assert [e["item_id"] for e in deleted] == [committed["item_id"]]
    assert [e["type"] for e in out.events].count("response.created") == 1


def test_tools_are_kept_and_echoed_as_sent(engine):
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

    async def talk() -> Recorder:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
        session.start()
        await session.receive(json.dumps({"type": "session.update", "session": {
            "tools": tools, "tool_choice": "required"}}))
        await session.receive(json.dumps({"type": "session.update", "session": {"tools": "get_weather"}}))
        await session.receive(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        session.close()
        return out

    out = run(talk())
    updated = [e["session"] for e in out.events if e["type"] == "session.updated"]
    assert updated[0]["tools"] == tools and updated[0]["tool_choice"] == "required"
    assert updated[-1]["tools"] == tools  # kept by a later update that does not name them
    errors = [e["error"] for e in out.events if e["type"] == "error"]
    assert [e["param"] for e in errors] == ["session.tools"]


def test_out_of_band_events_in_order(engine):
    """Out-of-band responses: metadata echoed, no conversation events, their items not retrievable; an
    item_reference names the latest user turn, any other is refused."""
    assert wait_idle(engine)  # the slots of the tests before are free

    async def talk() -> Recorder:
        out = Recorder()
        session = RealtimeSession(engine, ServerSettings(), "mini-omni", out)
        session.start()
        send = session.receive
        await send(json.dumps({"type": "session.update", "session": {
            "output_modalities": ["text"], "max_output_tokens": 4, "audio": {"input": {"turn_detection": None}}}}))
        await send(json.dumps({"type": "response.create", "response": {
            "conversation": "none", "metadata": {"topic": "classify"},
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Is it?"}]}]}}))
        done = await out.wait_for("response.done")
        await send(json.dumps({"type": "conversation.item.retrieve", "item_id": done["response"]["output"][0]["id"]}))
        await send(json.dumps({"type": "response.create", "response": {"conversation": "elsewhere"}}))
        await send(json.dumps({"type": "response.create", "response": {
            "conversation": "none", "input": [{"type": "item_reference", "id": "item_old"}]}}))
        await send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}}))
        user = (await out.wait_for("conversation.item.done"))["item"]["id"]
        await send(json.dumps({"type": "response.create", "response": {
            "conversation": "none", "input": [{"type": "item_reference", "id": user}]}}))
        while [e["type"] for e in out.events].count("response.done") < 2:
            out.arrived.clear()
            await out.arrived.wait()
        session.close()
        return out

    out = run(talk())
    types = [e["type"] for e in out.events]
    # Only the user message created on purpose is announced; neither answer's item is.
    assert types.count("conversation.item.added") == types.count("conversation.item.done") == 1, types
    assert [e["response"]["status"] for e in out.events if e["type"] == "response.done"] == ["completed"] * 2
    created = next(e for e in out.events if e["type"] == "response.created")["response"]
    done = next(e for e in out.events if e["type"] == "response.done")["response"]
    assert created["metadata"] == done["metadata"] == {"topic": "classify"}
    assert done["conversation_id"] is None and done["status"] == "completed"
    errors = [e["error"] for e in out.events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["item_retrieve_invalid_item_id", "invalid_value", "invalid_value"], errors
    assert errors[1]["param"] == "response.conversation" and errors[2]["param"] == "response.input[0].id"
