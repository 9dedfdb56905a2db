#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite.
# `.ci/run` calls this same script. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch 2.13.0 lies on this machine's disk; pinning it avoids a multi-GB CUDA download.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev]"
# openai-whisper is a test-only reference; its declared deps pull a 1 GB triton, so no deps
# (tiktoken, more-itertools and numba, which its import needs, come with the dev extra).
"$PY" -m pip install -q --no-deps openai-whisper
# Debian tools the tests use: espeak-ng speaks test questions, Chromium runs the web page.
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
"$PY" -m pytest -q "$@"
