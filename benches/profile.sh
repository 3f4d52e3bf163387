#!/usr/bin/env bash
# benches/profile.sh - instructions per request on the proxy's hot path (callgrind).
#
#   bash benches/profile.sh            # REQS_SECS=10 CONC=8 NGINX=1
#   BASELINE_BIN=/path/to/older/proxypal-server bash benches/profile.sh
#   ALIAS=0 bash benches/profile.sh    # skip the alias measurement
#   LEDGER=0 bash benches/profile.sh   # skip the ledger-on measurements (SQLite, and
#                                      # PostgreSQL at PG_URL when it answers)
#   CACHE=1 bash benches/profile.sh    # also a response-cache hit (off by default)
#   ANTHROPIC=1 bash benches/profile.sh  # also /v1/messages, plain and streamed, beside
#                                        # /v1/chat/completions streamed (off by default)
#
# Builds proxypal-server with symbols in a `profiling` profile (release settings,
# not stripped; output target/profiling/, the release binary is left alone),
# starts `nim-sim --fast` and the server under `valgrind --tool=callgrind` with
# collection off, turns collection on once the server answers, drives wrk for
# REQS_SECS seconds (non-streaming POST /v1/chat/completions), stops the server
# by PID and prints the top functions by inclusive
# and exclusive instructions, plus instructions per request. Then the same for
# nginx (the peer harness's key-injecting config, one process) in front of the
# same upstream, and the ratio (NGINX=0 skips it). With BASELINE_BIN, that
# binary (e.g. a build of the previous commit, for a before/after) is measured
# too, under the same conditions, and its ratio printed. With ALIAS=1 (the default) the
# same binary is measured once more with two providers and the request's model an alias
# over both (weights 1:2, so both are used), and the alias / direct ratio printed.
# Instruction counts do not
# depend on how busy the machine is: the steadiest proxy-vs-nginx figure here.
# Output: $BENCH_LOCAL/profile/<time>/ (NAME.callgrind.out, NAME.exclusive.txt,
# NAME.inclusive.txt, summary.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REQS_SECS=${REQS_SECS:-10}
CONC=${CONC:-8}
BENCH_LOCAL=${BENCH_LOCAL:-$ROOT/benches/peers/.local}
OUT=$BENCH_LOCAL/profile/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
SIM_PORT=18200
PROXY_PORT=18201
KEY=sk-bench-profile

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
command -v valgrind >/dev/null || { apt-get update -qq; apt-get install -y -qq valgrind >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq; apt-get install -y -qq wrk >/dev/null; }

log "building the profiling profile (release + symbols)"
cargo build -p proxypal-server -p proxypal-nim-sim --profile profiling \
    --config 'profile.profiling.inherits="release"' --config 'profile.profiling.strip="none"' \
    --config 'profile.profiling.debug="line-tables-only"'
BIN=$ROOT/target/profiling/proxypal-server
SIM=$ROOT/target/profiling/nim-sim

STARTED=()
stop_pid() {
    local pid=$1 i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done   # valgrind is slow to exit
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() { local i; for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_pid "${STARTED[i]}"; done; STARTED=(); }
trap cleanup EXIT
trap 'exit 130' INT TERM

"$SIM" --fast --listen "127.0.0.1:$SIM_PORT" >"$OUT/sim.log" 2>&1 &
SIM_PID=$!; STARTED+=("$SIM_PID")
cat >"$OUT/proxy.yaml" <<YAML
listen: "127.0.0.1:$PROXY_PORT"
upstream:
  base_url: "http://127.0.0.1:$SIM_PORT/v1"
keys: [fake-key-1, fake-key-2, fake-key-3]
rate_limit:
  requests_per_minute: 100000000
  burst: 100000000
auth:
  tokens: ["$KEY"]
log:
  level: warn
state:
  path: null
ledger:
  enabled: false
YAML
unset_env=()
for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset_env+=(-u "$v"); done
body='{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'

# measure NAME PORT CMD...: run CMD under callgrind (collection off), wait until it proxies,
# warm up, collect during REQS_SECS of wrk, stop it; leaves $OUT/NAME.* and prints a line.
measure() {
    local name=$1 port=$2; shift 2
    env "${unset_env[@]}" RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$OUT/$name.callgrind.out" "$@" >"$OUT/$name.log" 2>&1 &
    local pid=$! ready=0 i code
    STARTED+=("$pid")
    for i in $(seq 1 300); do   # 60 s (valgrind start-up is slow)
        kill -0 "$pid" 2>/dev/null || { cat "$OUT/$name.log" >&2; exit 1; }
        code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
            -d "$body" "http://127.0.0.1:$port/v1/chat/completions" || true)
        if [[ $code == 200 ]]; then ready=1; break; fi
        sleep 0.2
    done
    ((ready)) || { log "$name under valgrind not ready"; exit 1; }
    # warm the connection pool, then collect
    BENCH_CLIENT_KEY=$KEY timeout 30 wrk -t1 -c"$CONC" -d2s -s "$ROOT/benches/peers/lua/post.lua" \
        "http://127.0.0.1:$port${BENCH_PATH:-/v1/chat/completions}" >/dev/null 2>&1 || true
    callgrind_control -i on "$pid" >/dev/null
    BENCH_MODEL=${BENCH_MODEL:-meta/llama-3.1-8b-instruct} BENCH_CLIENT_KEY=$KEY timeout $((REQS_SECS + 20)) wrk -t1 -c"$CONC" -d"${REQS_SECS}s" --timeout 10s \
        -s "$ROOT/benches/peers/lua/post.lua" "http://127.0.0.1:$port${BENCH_PATH:-/v1/chat/completions}" >"$OUT/$name.wrk.txt" 2>&1 || true
    callgrind_control -i off "$pid" >/dev/null
    local reqs total
    reqs=$(sed -n 's/^WRKJSON //p' "$OUT/$name.wrk.txt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
    stop_pid "$pid"
    callgrind_annotate --inclusive=yes "$OUT/$name.callgrind.out" 2>/dev/null | head -80 >"$OUT/$name.inclusive.txt" || true
    callgrind_annotate "$OUT/$name.callgrind.out" 2>/dev/null | head -80 >"$OUT/$name.exclusive.txt" || true
    total=$(awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1; exit}' "$OUT/$name.exclusive.txt")
    total=${total:-0}
    PER_REQ[$name]=$((total / (reqs > 0 ? reqs : 1)))
    echo "$name: requests measured: $reqs; instructions: $total; per request: ${PER_REQ[$name]}" | tee -a "$OUT/summary.txt"
}
declare -A PER_REQ

measure proxypal "$PROXY_PORT" "$BIN" --config "$OUT/proxy.yaml"
echo "top exclusive: $OUT/proxypal.exclusive.txt; inclusive: $OUT/proxypal.inclusive.txt"

if [[ ${ALIAS:-1} == 1 ]]; then
    # Two providers on the same simulator, and an alias over both: routing, the body's
    # model rewritten per target, a worker client per provider.
    cat >"$OUT/alias.yaml" <<YAML
listen: "127.0.0.1:$PROXY_PORT"
providers:
  nvidia:
    base_url: "http://127.0.0.1:$SIM_PORT/v1"
    keys: [fake-key-1, fake-key-2, fake-key-3]
    rate_limit: { requests_per_minute: 100000000, burst: 100000000 }
  groq:
    base_url: "http://127.0.0.1:$SIM_PORT/v1"
    keys: [fake-key-4, fake-key-5]
    rate_limit: { requests_per_minute: 100000000, burst: 100000000 }
models:
  llama-8b:
    targets:
      - { provider: nvidia, model: meta/llama-3.1-8b-instruct, weight: 1 }
      - { provider: groq, model: llama-3.1-8b-instant, weight: 2 }
routing: { default_provider: nvidia }
auth:
  tokens: ["$KEY"]
log:
  level: warn
YAML
    BENCH_MODEL=llama-8b measure alias "$PROXY_PORT" "$BIN" --config "$OUT/alias.yaml"
    awk -v a="${PER_REQ[alias]}" -v p="${PER_REQ[proxypal]}" \
        'BEGIN{printf "instructions per request: alias / direct = %.3f\n", a / p}' | tee -a "$OUT/summary.txt"
fi

if [[ ${LEDGER:-1} == 1 ]]; then
    # The same with the usage ledger on (SQLite): the body tap, the record and
    # the writer thread's inserts, all in the one process callgrind watches.
    sed -e '/^state:/,$d' "$OUT/proxy.yaml" >"$OUT/ledger.yaml"
    printf 'state:\n  path: "%s/state.db"\nledger:\n  path: "%s/ledger.db"\n' "$OUT" "$OUT" >>"$OUT/ledger.yaml"
    measure ledger "$PROXY_PORT" "$BIN" --config "$OUT/ledger.yaml"
    awk -v l="${PER_REQ[ledger]}" -v p="${PER_REQ[proxypal]}" \
        'BEGIN{printf "instructions per request: ledger on / off = %.3f\n", l / p}' | tee -a "$OUT/summary.txt"
    # And with the PostgreSQL ledger (PG_URL; DROPS the ledger's tables
    # there first), when it answers: the proxy's side only — the server's
    # CPU is another process (benches/ledger.sh measures it).
    PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
    if command -v psql >/dev/null && psql "$PG_URL" -qtAc 'SELECT 1' >/dev/null 2>&1; then
        psql "$PG_URL" -q -f "$ROOT/benches/ledger-reset.sql" >/dev/null 2>&1
        sed -e '/^state:/,$d' "$OUT/proxy.yaml" >"$OUT/ledger-pg.yaml"
        printf 'state:\n  path: "%s/state-pg.db"\nledger:\n  backend: postgres\n  url: "%s"\n' "$OUT" "$PG_URL" >>"$OUT/ledger-pg.yaml"
        measure ledger-pg "$PROXY_PORT" "$BIN" --config "$OUT/ledger-pg.yaml"
        awk -v l="${PER_REQ[ledger-pg]}" -v p="${PER_REQ[proxypal]}" \
            'BEGIN{printf "instructions per request: PostgreSQL ledger on / off = %.3f\n", l / p}' | tee -a "$OUT/summary.txt"
    else
        log "PostgreSQL ledger left out: $PG_URL does not answer (set PG_URL)"
    fi
fi

if [[ ${CACHE:-0} == 1 ]]; then
    # The same request answered from the response cache: the warm-up stores
    # it, every measured request is a hit (no key, no upstream).
    cp "$OUT/proxy.yaml" "$OUT/cache.yaml"
    printf 'cache:\n  enabled: true\n' >>"$OUT/cache.yaml"
    measure cache "$PROXY_PORT" "$BIN" --config "$OUT/cache.yaml"
    awk -v c="${PER_REQ[cache]}" -v p="${PER_REQ[proxypal]}" \
        'BEGIN{printf "instructions per request: cache hit / proxied = %.3f\n", c / p}' | tee -a "$OUT/summary.txt"
fi

if [[ ${ANTHROPIC:-0} == 1 ]]; then
    # The same upstream answers through Anthropic's Messages API: the request
    # translated to a chat completion, the answer (or each streamed chunk) back.
    BENCH_API=messages BENCH_PATH=/v1/messages measure messages "$PROXY_PORT" "$BIN" --config "$OUT/proxy.yaml"
    BENCH_STREAM=1 measure stream "$PROXY_PORT" "$BIN" --config "$OUT/proxy.yaml"
    BENCH_STREAM=1 BENCH_API=messages BENCH_PATH=/v1/messages measure messages_stream "$PROXY_PORT" "$BIN" --config "$OUT/proxy.yaml"
    awk -v m="${PER_REQ[messages]}" -v p="${PER_REQ[proxypal]}" -v s="${PER_REQ[stream]}" -v ms="${PER_REQ[messages_stream]}" \
        'BEGIN{printf "instructions per request: messages / chat = %.3f (+%d); streamed: %.3f (+%d)\n", m / p, m - p, ms / s, ms - s}' \
        | tee -a "$OUT/summary.txt"
fi

if [[ -n ${BASELINE_BIN:-} ]]; then
    measure baseline "$PROXY_PORT" "$BASELINE_BIN" --config "$OUT/proxy.yaml"
    awk -v p="${PER_REQ[proxypal]}" -v b="${PER_REQ[baseline]}" \
        'BEGIN{printf "instructions per request: proxypal / baseline = %.3f\n", p / b}' | tee -a "$OUT/summary.txt"
fi

# The C reference under the same conditions: the peer harness's nginx config (one worker,
# upstream keep-alive, a fake key per request), run as a single process so callgrind sees it all.
if [[ ${NGINX:-1} == 1 ]] && command -v nginx >/dev/null; then
    NGINX_PORT=$((PROXY_PORT + 1))
    mkdir -p "$OUT/nginx/logs" "$OUT/nginx/tmp"
    sed -e "s|@PORT@|$NGINX_PORT|g" -e "s|@UPSTREAM@|127.0.0.1:$SIM_PORT|g" -e "s|@WORKERS@|1|g" \
        "$ROOT/benches/peers/conf/proxy.nginx.conf.tmpl" >"$OUT/nginx/nginx.conf"
    measure nginx "$NGINX_PORT" nginx -p "$OUT/nginx/" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/logs/error.log" \
        -g 'master_process off;'
    awk -v p="${PER_REQ[proxypal]}" -v n="${PER_REQ[nginx]}" \
        'BEGIN{printf "instructions per request: proxypal / nginx = %.2f\n", p / n}' | tee -a "$OUT/summary.txt"
fi
cleanup
