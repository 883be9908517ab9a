#!/usr/bin/env bash
# Build the image, start it on the demo, and stream one request per demo model (base + adapters).
# For anyone with Docker (and, by default, a GPU); not run in CI. Every wait is bounded.
#
#   bash scripts/docker_smoke.sh                  # docker run --gpus all
#   DOCKER_RUN_ARGS= bash scripts/docker_smoke.sh # no GPU: the image on the CPU (native kernels)
#   IMAGE=loragate:test PORT=18000 bash scripts/docker_smoke.sh
#
# Checks: the build (which installs gcc/g++ and verifies the demo weights), the container runs as
# a non-root user with a C compiler inside, /health turns 200 (model loaded, kernel self-check
# passed), each model streams SSE chunks ending in [DONE], and Docker's HEALTHCHECK reports healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-loragate:smoke}"
PORT="${PORT:-18000}"
NAME="loragate-smoke-$$"
DOCKER_RUN_ARGS="${DOCKER_RUN_ARGS---gpus all}"
START_TIMEOUT="${START_TIMEOUT:-600}"

fail() { echo "FAIL: $*" >&2; docker logs --tail 50 "$NAME" >&2 2>/dev/null || true; exit 1; }
cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

command -v docker >/dev/null || { echo "docker not found" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "no Docker daemon reachable" >&2; exit 2; }

echo "== build $IMAGE"
start=$(date +%s)
timeout 3600 docker build -t "$IMAGE" . || fail "docker build"
echo "   built in $(( $(date +%s) - start )) s; size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

echo "== run"
# shellcheck disable=SC2086  # DOCKER_RUN_ARGS is a list of flags
docker run -d --name "$NAME" $DOCKER_RUN_ARGS -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null || fail "docker run"
uid=$(timeout 60 docker exec "$NAME" id -u) || fail "docker exec"
[ "$uid" != "0" ] || fail "the server runs as root"
timeout 60 docker exec "$NAME" sh -c 'command -v gcc && command -v g++' >/dev/null || fail "no C/C++ compiler in the image"
echo "   uid $uid, gcc and g++ present"

deadline=$(( $(date +%s) + START_TIMEOUT ))
until curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
  [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = "true" ] || fail "the container exited before /health"
  [ "$(date +%s)" -lt "$deadline" ] || fail "/health not ready after ${START_TIMEOUT} s"
  sleep 2
done
echo "   /health ok after $(( $(date +%s) - start )) s since the build started"
docker logs "$NAME" 2>&1 | grep -E "kernel self-check|kernels: torch path|LoRA:" | sed 's/^/   log: /' || true

echo "== one streamed request per demo model"
models=$(curl -fsS --max-time 30 "http://127.0.0.1:$PORT/v1/models" \
  | python3 -c 'import json, sys; print(" ".join(m["id"] for m in json.load(sys.stdin)["data"]))') || fail "/v1/models"
[ -n "$models" ] || fail "no models listed"
for model in $models; do
  body=$(printf '{"model": "%s", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 16, "stream": true}' "$model")
  out=$(curl -fsS -N --max-time 120 -H 'Content-Type: application/json' -d "$body" \
    "http://127.0.0.1:$PORT/v1/chat/completions") || fail "$model: request failed"
  chunks=$(printf '%s\n' "$out" | grep -c '^data: {' || true)
  printf '%s\n' "$out" | grep -q '^data: \[DONE\]' || fail "$model: stream did not end with [DONE]"
  [ "$chunks" -ge 1 ] || fail "$model: no chunks"
  text=$(printf '%s\n' "$out" | grep '^data: {' | sed 's/^data: //' \
    | python3 -c 'import json, sys; print("".join((json.loads(l)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for l in sys.stdin))')
  echo "   $model: $chunks chunks: ${text:0:60}"
done

echo "== Docker HEALTHCHECK"
deadline=$(( $(date +%s) + 120 ))
while :; do
  status=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
  [ "$status" = "healthy" ] && break
  [ "$status" != "unhealthy" ] || fail "HEALTHCHECK reports unhealthy"
  [ "$(date +%s)" -lt "$deadline" ] || fail "HEALTHCHECK still '$status' after 120 s"
  sleep 5
done
echo "   healthy"
echo "PASS"
