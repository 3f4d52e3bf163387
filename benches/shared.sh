#!/usr/bin/env bash
# benches/shared.sh - what sharing the quota through Redis costs one replica.
#
#   bash benches/shared.sh          # ROUNDS=3 SECS=5 KEYS=100
#
# Starts `nim-sim --fast`, a redis-server of its own (loopback, no persistence)
# and proxypal-server twice over the same 100 keys: once counting alone
# (`local`), once with `shared:` (every attempt one EVALSHA on Redis). For each
# round, in alternation (local, shared, local, shared, …, so both see the same
# machine): wrk at concurrency 1 (latency p50/p99: the added latency per
# request) and at concurrency 32 (requests per second). Limits are far above
# what the load reaches, so nothing waits: the figures are the admission path
# alone. Prints one line per run and the medians; output in
# $BENCH_LOCAL/shared/<time>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
KEYS=${KEYS:-100}
BENCH_LOCAL=${BENCH_LOCAL:-$ROOT/benches/peers/.local}
OUT=$BENCH_LOCAL/shared/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
SIM_PORT=18300 REDIS_PORT=18301 PROXY_PORT=18302
CLIENT_KEY=sk-bench-shared
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
command -v wrk >/dev/null || { apt-get update -qq; apt-get install -y -qq wrk >/dev/null; }
command -v redis-server >/dev/null || { apt-get update -qq; apt-get install -y -qq redis-server >/dev/null; }
STARTED=()
cleanup() { for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

log "cargo build --release -p proxypal-server -p proxypal-nim-sim"
cargo build --release -q -p proxypal-server -p proxypal-nim-sim
SERVER=$ROOT/target/release/proxypal-server
"$ROOT/target/release/nim-sim" --listen "127.0.0.1:$SIM_PORT" --fast >"$OUT/sim.log" 2>&1 &
STARTED+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT" >"$OUT/redis.log" 2>&1 &
STARTED+=($!)
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done

keys=$(for i in $(seq 1 "$KEYS"); do printf '"nvapi-bench-shared-%06d",' "$i"; done)
config() {   # config MODE
    cat <<YAML
listen: "127.0.0.1:$PROXY_PORT"
upstream:
  base_url: "http://127.0.0.1:$SIM_PORT/v1"
keys: [${keys%,}]
rate_limit:
  requests_per_minute: 100000000
auth:
  tokens: ["$CLIENT_KEY"]
state:
  path: null
log:
  level: warn
YAML
    if [[ $1 == shared ]]; then
        printf 'shared:\n  redis_url: redis://127.0.0.1:%s/0\n' "$REDIS_PORT"
    fi
}

run() {   # run MODE ROUND
    local mode=$1 round=$2 pid
    config "$mode" >"$OUT/$mode.yaml"
    local unset=() v
    for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset+=(-u "$v"); done
    env "${unset[@]}" "$SERVER" --config "$OUT/$mode.yaml" >"$OUT/$mode-$round.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/health" && break; sleep 0.05; done
    for c in 1 32; do
        BENCH_CLIENT_KEY=$CLIENT_KEY wrk -t$(( c > 1 ? 2 : 1 )) -c$c -d"${SECS}s" --latency \
            -s "$ROOT/benches/peers/lua/post.lua" "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" \
            >"$OUT/$mode-$round-c$c.txt" 2>&1
        printf '%s round %s c=%s %s\n' "$mode" "$round" "$c" "$(sed -n 's/^WRKJSON //p' "$OUT/$mode-$round-c$c.txt")" \
            | tee -a "$OUT/summary.txt"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    run local "$round"
    run shared "$round"
done
python3 - "$OUT/summary.txt" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    if "{" not in line:
        continue
    mode, _, _, c = line.split()[:4]
    runs.setdefault((mode, c), []).append(json.loads(line[line.index("{"):]))
med = lambda mode, c, f: statistics.median(r[f] for r in runs[(mode, c)])
for f in ("p50_us", "p99_us"):
    l, s = med("local", "c=1", f), med("shared", "c=1", f)
    print(f"c=1 {f}: local {l:.0f} us, shared {s:.0f} us, added {s - l:+.0f} us")
l, s = med("local", "c=32", "rps"), med("shared", "c=32", "rps")
print(f"c=32 rps: local {l:.0f}, shared {s:.0f}, shared/local {s / l:.3f}")
PY
redis-cli -p "$REDIS_PORT" INFO commandstats | grep -E "cmdstat_(evalsha|eval):" | tr -d '\r' | tee -a "$OUT/summary.txt"
echo "redis used_memory: $(redis-cli -p "$REDIS_PORT" INFO memory | sed -n 's/^used_memory_human://p' | tr -d '\r')" | tee -a "$OUT/summary.txt"
log "output in $OUT"
