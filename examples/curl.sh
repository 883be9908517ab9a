#!/usr/bin/env bash
# Plain HTTP against loragate: one ordinary chat completion, then one streamed as server-sent events.
# Start the demo server (`loragate serve`), then run `bash examples/curl.sh`.
set -euo pipefail

BASE_URL="${LORAGATE_BASE_URL:-http://127.0.0.1:8000/v1}"
API_KEY="${LORAGATE_API_KEY:-none}"

echo "== shout (non-streaming)"
curl -sS --fail-with-body "$BASE_URL/chat/completions" \
  -H "Authorization: Bearer $API_KEY" \
  -H "Content-Type: application/json" \
  -d '{"model": "shout", "messages": [{"role": "user", "content": "moon river cat"}], "temperature": 0}'
echo

echo "== reverse (streaming; -N prints each event as it arrives)"
curl -sS -N --fail-with-body "$BASE_URL/chat/completions" \
  -H "Authorization: Bearer $API_KEY" \
  -H "Content-Type: application/json" \
  -d '{"model": "reverse", "messages": [{"role": "user", "content": "moon river cat"}], "temperature": 0, "stream": true}'
