#!/usr/bin/env bash
# curl through ProxyPal: plain chat, streaming chat, models, health, stats, metrics.
#
#   cargo run --release -p proxypal-server -- --dev     # in another terminal
#   bash examples/curl.sh
#
# PROXYPAL (default http://127.0.0.1:8080) and PROXYPAL_TOKEN (if auth.tokens is set).
set -euo pipefail
PROXYPAL=${PROXYPAL:-http://127.0.0.1:8080}
auth=()
[[ -n "${PROXYPAL_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $PROXYPAL_TOKEN")
body='{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"Hello"}]}'

echo "== plain chat"
curl -sS --fail-with-body "${auth[@]}" "$PROXYPAL/v1/chat/completions" \
  -H 'Content-Type: application/json' -d "$body"
echo; echo "== streaming chat (events arrive as the upstream sends them)"
curl -sS -N --fail-with-body "${auth[@]}" "$PROXYPAL/v1/chat/completions" \
  -H 'Content-Type: application/json' -d "${body%\}},\"stream\":true}"
echo "== models"
curl -sS --fail-with-body "${auth[@]}" "$PROXYPAL/v1/models" | head -c 300; echo
echo "== health (always open)"
curl -sS "$PROXYPAL/health"; echo
echo "== stats (needs the token when auth.tokens is set)"
curl -sS --fail-with-body "${auth[@]}" "$PROXYPAL/stats" | head -c 400; echo
echo "== metrics (Prometheus text)"
curl -sS --fail-with-body "${auth[@]}" "$PROXYPAL/metrics" | grep -E '^proxypal_(requests_total|keys)' | head
