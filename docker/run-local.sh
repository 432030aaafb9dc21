#!/usr/bin/env bash
# docker-compose.yml (the app + vLLM's CPU build) on a machine that reaches only the package
# registries: no container registry, no Hugging Face Hub, no bridge network. Builds both images
# from BASE (a local Python 3.11 image), runs them through docker/compose.local.yml with a host
# folder as the shared /data, checks that vLLM answers the app's chat and loads a version the
# worker publishes, then stops them (KEEP=1 leaves them running).
#   BASE=local/python:3.11-bookworm MODEL_DIR=<the app's SmolLM2-135M-Instruct-from-gguf> \
#   DATA=<empty folder> docker/run-local.sh
# RLHF_DEMO_ADMIN_TOKEN comes from the environment (one is generated when unset).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
: "${BASE:?a Python 3.11 base image}" "${MODEL_DIR:?the converted SmolLM2 folder}" "${DATA:?a folder for /data}"
export RLHF_DEMO_DOCKER_DATA=$DATA GRADIO_SERVER_PORT=${GRADIO_SERVER_PORT:-7860}
export RLHF_DEMO_ADMIN_TOKEN=${RLHF_DEMO_ADMIN_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=(-p rlhf-demo-local -f docker-compose.yml -f docker/compose.local.yml)
stamp() { echo "[$(date -u +%T)] $*"; }

ctx=$(mktemp -d) && trap 'rm -rf "$ctx"' EXIT
git archive --format=tar HEAD | tar -C "$ctx" -x
for spec in "rlhf-demo:local Dockerfile" "rlhf-demo-vllm:local docker/vllm-cpu.Dockerfile"; do
  set -- $spec && stamp "build $1"
  docker build -q --network host --build-arg BASE="$BASE" --build-arg TORCH_INDEX=https://pypi.org/simple -t "$1" -f "$ctx/$2" "$ctx"
done
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^rlhf-demo(-vllm)?:local '

model="$DATA/models/SmolLM2-135M-Instruct-from-gguf"
[ -f "$model/config.json" ] || { mkdir -p "$DATA/models" && cp -a "$MODEL_DIR" "$model"; }
chown -R 1000:1000 "$DATA"  # the app runs as uid 1000 and writes /data
# `run`, not `up`, for the app: it publishes no ports, which host networking refuses, and it
# waits for vLLM's health check as `up` does.
name=rlhf-demo-local-app
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$ctx"; docker rm -f "$name" >/dev/null; "${compose[@]}" down -v' EXIT
stamp "up" && "${compose[@]}" up -d --no-build vllm && "${compose[@]}" run -d --name "$name" app
stamp "vLLM healthy, app started"
app="http://127.0.0.1:$GRADIO_SERVER_PORT/"
for _ in $(seq 1 300); do curl -sf "$app" >/dev/null && break; sleep 2; done
curl -sf "$app" >/dev/null && stamp "page served at $app by $(docker exec "$name" id -un)"
python3 docker/check_local.py "$app" http://127.0.0.1:8000 "$name"
stamp "checked"
