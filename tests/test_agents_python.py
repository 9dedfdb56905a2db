"""The Python ``openai-agents`` realtime client, unchanged, in an environment of its own
(``.venv-agents``, which scripts/test.sh makes: openai-agents needs websockets<17, the server
runs a newer one): a session with the SDK's defaults, an agent with a tool, a spoken answer, and
a history edit that sends ``conversation.item.delete``. No error event may come back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import engine_fixture, port_fixture, wait_idle

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-agents" / "bin" / "python"
CLIENT = Path(__file__).resolve().parent / "clients" / "agents_python.py"


def _client_ready() -> str | None:
    if not PYTHON.is_file():
        return f"{PYTHON} is missing: scripts/test.sh makes it (python -m venv --system-site-packages .venv-agents)"
    done = subprocess.run([str(PYTHON), "-c", "import agents.realtime"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"openai-agents does not import in .venv-agents: {done.stderr[-300:]}"


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_client_ready() is not None, reason=str(_client_ready()))]

engine = engine_fixture(2)
port = port_fixture()


def test_the_python_agents_sdk_talks_edits_its_history_and_gets_no_error(port, engine):
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=mini-omni"
    done = subprocess.run([str(PYTHON), str(CLIENT), url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["events"].get("audio", 0) > 0 and result["audio_bytes"] > 0
    assert result["events"].get("agent_end") == 1 and result["events"].get("audio_end", 0) >= 1
    # The question was deleted from the history: only the answer is left.
    assert [item["role"] for item in result["history"]] == ["assistant"]
    assert wait_idle(engine)
