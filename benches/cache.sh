#!/usr/bin/env bash
# benches/cache.sh - what a response-cache hit costs beside a proxied request.
#
#   bash benches/cache.sh          # ROUNDS=3 SECS=5
#
# Starts `nim-sim --fast` and proxypal-server two ways over the same keys and
# the same request (benches/peers/lua/post.lua, `temperature` unset):
# `proxied` (cache.enabled: false: every request goes to the simulator) and
# `hit` (cache.enabled: true: the first request goes upstream, every other
# one is a hit), each for a plain and a streaming request. Each round runs
# the modes in alternation (every mode sees the same machine) with wrk at
# concurrency 32 (requests per second, and the CPU time the proxy and the
# simulator spent per request, from /proc/<pid>/stat) and 1 (latency). The
# ledger is off in both, so only the cache differs. Prints one line per run,
# the medians and ratios to `proxied`; output in $BENCH_LOCAL/cache/<time>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
KEYS=${KEYS:-100}
BENCH_LOCAL=${BENCH_LOCAL:-$ROOT/benches/peers/.local}
OUT=$BENCH_LOCAL/cache/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
SIM_PORT=18320 PROXY_PORT=18322
CLIENT_KEY=sk-bench-cache
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
command -v wrk >/dev/null || { apt-get update -qq; apt-get install -y -qq wrk >/dev/null; }
STARTED=()
cleanup() { for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

log "cargo build --release -p proxypal-server -p proxypal-nim-sim"
cargo build --release -q -p proxypal-server -p proxypal-nim-sim
SERVER=$ROOT/target/release/proxypal-server
"$ROOT/target/release/nim-sim" --listen "127.0.0.1:$SIM_PORT" --fast >"$OUT/sim.log" 2>&1 &
SIM_PID=$!
STARTED+=($SIM_PID)
TICKS=$(getconf CLK_TCK)
# CPU time (user + system) of a process so far, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

keys=$(for i in $(seq 1 "$KEYS"); do printf '"nvapi-bench-cache-%06d",' "$i"; done)
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
ledger:
  enabled: false
log:
  level: warn
YAML
    case $1 in
        hit) printf 'cache:\n  enabled: true\n' ;;
    esac
}

run() {   # run MODE STREAM ROUND
    local mode=$1 stream=$2 round=$3 pid name
    name=$mode$([[ $stream == 1 ]] && echo -stream || true)
    config "$mode" >"$OUT/$mode.yaml"
    local unset=() v
    for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset+=(-u "$v"); done
    env "${unset[@]}" "$SERVER" --config "$OUT/$mode.yaml" >"$OUT/$name-$round.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/health" && break; sleep 0.05; done
    for c in 32 1; do
        local p0 s0
        p0=$(cpu "$pid") s0=$(cpu "$SIM_PID")
        BENCH_STREAM=$stream BENCH_CLIENT_KEY=$CLIENT_KEY wrk -t$(( c > 1 ? 2 : 1 )) -c$c -d"${SECS}s" --latency \
            -s "$ROOT/benches/peers/lua/post.lua" "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" \
            >"$OUT/$name-$round-c$c.txt" 2>&1
        local json
        json=$(sed -n 's/^WRKJSON //p' "$OUT/$name-$round-c$c.txt")
        json=$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); t=int(sys.argv[4]); n=max(j["requests"],1)
j["proxy_cpu_us"]=(int(sys.argv[2]))*1e6/t/n; j["sim_cpu_us"]=(int(sys.argv[3]))*1e6/t/n; print(json.dumps(j))' \
            "$json" "$(( $(cpu "$pid") - p0 ))" "$(( $(cpu "$SIM_PID") - s0 ))" "$TICKS")
        printf '%s round %s c=%s %s\n' "$name" "$round" "$c" "$json" | tee -a "$OUT/summary.txt"
    done
    curl -s -H "authorization: Bearer $CLIENT_KEY" "http://127.0.0.1:$PROXY_PORT/stats" \
        | python3 -c 'import json,sys; c=json.load(sys.stdin).get("cache"); print("  cache:", c and {k: c[k] for k in ("hits","misses","saved_requests")})' \
        | tee -a "$OUT/summary.txt"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    for stream in 0 1; do
        for mode in proxied hit; do run "$mode" "$stream" "$round"; done
    done
done
python3 - "$OUT/summary.txt" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    if "{" not in line or "round" not in line:
        continue
    name, _, _, c = line.split()[:4]
    runs.setdefault((name, c), []).append(json.loads(line[line.index("{"):]))
med = lambda name, c, f: statistics.median(r[f] for r in runs[(name, c)])
print("| request | mode | c=32 req/s | proxy CPU µs/req | simulator CPU µs/req | c=1 p50 µs | c=1 p99 µs |")
print("|---|---|---:|---:|---:|---:|---:|")
for kind, suffix in (("plain", ""), ("stream", "-stream")):
    base = med("proxied" + suffix, "c=32", "rps")
    base_cpu = med("proxied" + suffix, "c=32", "proxy_cpu_us")
    base_p50 = med("proxied" + suffix, "c=1", "p50_us")
    for mode in ("proxied", "hit"):
        n = mode + suffix
        rps, cpu = med(n, "c=32", "rps"), med(n, "c=32", "proxy_cpu_us")
        p50 = med(n, "c=1", "p50_us")
        ratio = "" if mode == "proxied" else f" ({rps / base:.2f}×)"
        cpu_ratio = "" if mode == "proxied" else f" ({cpu / base_cpu:.2f}×)"
        p50_ratio = "" if mode == "proxied" else f" ({p50 / base_p50:.2f}×)"
        print(f"| {kind} | {mode} | {rps:,.0f}{ratio} | {cpu:.1f}{cpu_ratio} | {med(n, 'c=32', 'sim_cpu_us'):.1f} | "
              f"{p50:.0f}{p50_ratio} | {med(n, 'c=1', 'p99_us'):.0f} |")
PY
log "output in $OUT"
