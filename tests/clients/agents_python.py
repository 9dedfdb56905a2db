"""The Python openai-agents realtime client, unchanged, against a miniomni server (run by
tests/test_agents_python.py in an environment of its own: openai-agents needs websockets<17).

    python agents_python.py ws://127.0.0.1:PORT/v1/realtime?model=mini-omni

Opens a session with the SDK's defaults (but a 48-token answer, to keep the test short) and an
agent that has a tool, sends a written question,
waits for the spoken answer, then edits the history by deleting the question (a raw
conversation.item.delete, as an application editing its history sends it). Prints one JSON line:
the SDK's event types, the server's error events and what the history held.
"""

from __future__ import annotations

import asyncio
import json
import sys

from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner
from agents.realtime.model_inputs import RealtimeModelSendRawMessage


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"It is sunny in {city}."


async def main(url: str) -> dict:
    agent = RealtimeAgent(name="Assistant", instructions="Answer briefly.", tools=[get_weather])
    runner = RealtimeRunner(agent)
    seen: list[str] = []
    errors: list[str] = []
    audio_bytes = 0
    history: list[dict] = []
    model_config = {"url": url, "api_key": "unused", "initial_model_settings": {"max_output_tokens": 48}}
    async with await runner.run(model_config=model_config) as session:
        await session.send_message("What is your name?")
        deleted = False
        async with asyncio.timeout(120):
            async for event in session:
                seen.append(event.type)
                if event.type == "error":
                    errors.append(str(event.error))
                elif event.type == "audio":
                    audio_bytes += len(event.audio.data)
                elif event.type == "raw_model_event" and getattr(event.data, "type", "") == "error":
                    errors.append(str(event.data))
                elif event.type == "history_updated":
                    history = [{"id": item.item_id, "role": getattr(item, "role", None)} for item in event.history]
                if event.type == "agent_end" and not deleted:
                    user = next((item for item in history if item["role"] == "user"), None)
                    if user is None:
                        break
                    await session.model.send_event(RealtimeModelSendRawMessage(
                        message={"type": "conversation.item.delete", "other_data": {"item_id": user["id"]}}))
                    deleted = True
                elif deleted and event.type == "history_updated":
                    break
    counts = {kind: seen.count(kind) for kind in dict.fromkeys(seen)}
    return {"events": counts, "errors": errors, "audio_bytes": audio_bytes, "history": history}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
