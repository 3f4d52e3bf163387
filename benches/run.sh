#!/usr/bin/env bash
# benches/run.sh - the whole performance check in one command (`just bench-all`).
#
#   bash benches/run.sh
#
# 1. builds the release server and the simulated upstream (shared target/);
# 2. the peer harness (benches/peers/run_peers.sh): direct, nginx and ProxyPal
#    in one run, wrk at concurrency 1 and 64, SSE timings and bursts;
# 3. the quota test (bins/proxypal-server/tests/integration/quota.rs): token bucket and
#    rolling 60 s window tables;
# 4. memory: idle RSS of proxypal-server in front of `nim-sim --fast`, RSS after
#    a short wrk load, RSS with 1,000 concurrent open SSE streams;
# 5. the stripped release binary's size;
# and prints one line, `SUMMARY k=v ...`, to compare between commits.
#
# Knobs (env):
#   REPEAT=3        peer-harness rounds (medians)      LITELLM=0   1 adds LiteLLM (slow install)
#   BUILD=1 PEERS=1 QUOTA=1 MEM=1                      0 skips that step
#   QUOTA_SECS=60   quota test duration per table      STREAMS=1000 open streams for the RSS check
#   DURATION=15 WARMUP=3 ...                           passed through to run_peers.sh
#   BENCH_LOCAL     results/build dir (default benches/peers/.local)
# Results of a run: $BENCH_LOCAL/results/<run>/ (results.md, quota.txt, mem.txt, summary.txt).
# Everything started here is stopped by PID; every step is bounded by `timeout`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REPEAT=${REPEAT:-3}
LITELLM=${LITELLM:-0}
BUILD=${BUILD:-1}
PEERS=${PEERS:-1}
QUOTA=${QUOTA:-1}
MEM=${MEM:-1}
STREAMS=${STREAMS:-1000}
export BENCH_LOCAL=${BENCH_LOCAL:-$ROOT/benches/peers/.local}
REV=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then REV="$REV-dirty"; fi
export RUN_ID=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)-$REV}
OUT=$BENCH_LOCAL/results/$RUN_ID
mkdir -p "$OUT"
SERVER=$ROOT/target/release/proxypal-server
SIM=$ROOT/target/release/nim-sim
SSE_LOAD=$BENCH_LOCAL/target/release/sse-load
MEM_SIM_PORT=${MEM_SIM_PORT:-18100}
MEM_PROXY_PORT=${MEM_PROXY_PORT:-18101}
CLIENT_KEY=sk-bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

STARTED=()
stop_pid() {   # stop one process this script started, by PID (TERM, then KILL)
    local pid=$1 i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
    local -a keep=()
    local p
    for p in "${STARTED[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}
cleanup() {
    local i pids=("${STARTED[@]}")
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
kb() { awk -v f="$1:" '$1==f{print $2}' "/proc/$2/status" 2>/dev/null || echo 0; }
mb() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

# ------------------------------------------------------------------ build ---
# Everything is built here, once, the quota test binary too, so that every step
# measures the same build even if the tree changes during the run. Order
# matters: `cargo test` builds target/release/proxypal-server with the
# dev-dependencies' features unified in (a different, larger binary); the
# `cargo build` after it relinks the binary users get, which is measured.
QUOTA_BIN=""
if [[ $BUILD == 1 ]]; then
    log "cargo build --release -p proxypal-server -p proxypal-nim-sim (+ the quota test)"
    QUOTA_BIN=$(cargo test --release -p proxypal-server --test integration --no-run --message-format=json \
        | python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])')
    cargo build --release -p proxypal-server -p proxypal-nim-sim
fi
[[ -x $SERVER && -x $SIM ]] || { log "missing $SERVER or $SIM (run with BUILD=1)"; exit 1; }
BIN_SHA=$(sha256sum "$SERVER" | cut -c1-12)
log "server binary $SERVER sha256 $BIN_SHA"

# ------------------------------------------------------------------ peers ---
PEER_SUMMARY=""
if [[ $PEERS == 1 ]]; then
    targets="direct nginx proxypal"
    [[ $LITELLM == 1 ]] && targets="direct nginx litellm proxypal"
    log "peer harness: TARGETS='$targets' REPEAT=$REPEAT -> $OUT"
    PROXYPAL_BIN=$SERVER TARGETS=$targets REPEAT=$REPEAT bash "$ROOT/benches/peers/run_peers.sh" \
        || log "WARNING: peer harness exited with $?"
    if [[ -s $OUT/results.jsonl ]]; then
        PEER_SUMMARY=$(python3 "$ROOT/benches/peers/report.py" --summary "$OUT")
    fi
else
    # the memory step still needs sse-load and wrk
    TARGETS="direct nginx proxypal" bash "$ROOT/benches/peers/run_peers.sh" --setup
fi

# ------------------------------------------------------------------ quota ---
QUOTA_SUMMARY=""
if [[ $QUOTA == 1 ]]; then
    secs=${QUOTA_SECS:-60}
    log "quota test: 2 x ${secs}s (token bucket, rolling window), the 80-at-once burst, 150 s sustained at 3x"
    rc=0
    if [[ -n $QUOTA_BIN ]]; then   # the test binary built above
        (cd "$ROOT/bins/proxypal-server" && QUOTA_SECS=$secs timeout $((secs * 2 + 150 + 180)) \
            "$QUOTA_BIN" quota:: --ignored --nocapture --test-threads 1) >"$OUT/quota.txt" 2>&1 || rc=$?
    else
        QUOTA_SECS=$secs timeout $((secs * 2 + 150 + 1200)) \
            cargo test --release -p proxypal-server --test integration quota:: -- --ignored --nocapture --test-threads 1 \
            >"$OUT/quota.txt" 2>&1 || rc=$?
    fi
    # table rows (libtest may print "test name ... " in front of a row)
    sed -n 's/^[^|]*\(|.*|\)[[:space:]]*$/\1/p' "$OUT/quota.txt" | awk '!seen[$0]++' >"$OUT/quota.md" || true
    cat "$OUT/quota.md" >&2
    # | name | dur | quota | served | of quota | 429s | failures | per key ±spread | max in 60 s |
    # | burst: … | served N of 80 | median wait … | max … | upstream 429s N |
    # | sustained 3× … | served N of M (P %) | upstream 429s N | max in any 60 s … |
    QUOTA_SUMMARY=$(awk -F'|' '
        /^\| token bucket/        {b=$6; b429=$7; bf=$8; bs=$9}
        /^\| rolling 60 s window/ {w=$6; w429=$7; wf=$8; ws=$9}
        /^\| burst:/              {bu=$3; bm=$4; b429x=$6}
        /^\| sustained/           {su=$3; s429=$4}
        function t(x) { gsub(/[ %]/, "", x); return x }
        function n(x) { gsub(/ +$/, "", x); sub(/.*[^0-9]/, "", x); return x + 0 }
        function sp(x) { sub(/.*±/, "", x); gsub(/[ %]/, "", x); return x }
        END {
            printf "quota_bucket=%s%% quota_window=%s%% upstream_429=%s client_failures=%s key_spread_max=%s%%",
                t(b), t(w), t(b429) + t(w429) + n(b429x) + n(s429), t(bf) + t(wf), (sp(bs) + 0 > sp(ws) + 0 ? sp(bs) : sp(ws))
            gsub(/^ +| +$/, "", bu); gsub(/^ +| +$/, "", bm); gsub(/^ +| +$/, "", su)
            printf " burst=\"%s, %s\" sustained=\"%s\"", bu, bm, su
        }' "$OUT/quota.md")
    [[ $rc == 0 ]] || { log "quota test exited with $rc (a target missed or it failed; see $OUT/quota.txt)"; QUOTA_SUMMARY+=" quota_test=FAIL"; }
fi

# ----------------------------------------------------------------- memory ---
start_pair() {   # start_pair SIM_ARGS... : nim-sim + proxypal-server in front of it
    port_free "$MEM_SIM_PORT" || { log "port $MEM_SIM_PORT busy"; return 1; }
    port_free "$MEM_PROXY_PORT" || { log "port $MEM_PROXY_PORT busy"; return 1; }
    "$SIM" --listen "127.0.0.1:$MEM_SIM_PORT" "$@" >"$OUT/mem-sim.log" 2>&1 &
    SIM_PID=$!; STARTED+=("$SIM_PID")
    cat >"$OUT/mem-proxy.yaml" <<YAML
listen: "127.0.0.1:$MEM_PROXY_PORT"
upstream:
  base_url: "http://127.0.0.1:$MEM_SIM_PORT/v1"
keys: [fake-key-1, fake-key-2, fake-key-3]
rate_limit:
  requests_per_minute: 100000000
  burst: 100000000
auth:
  tokens: ["$CLIENT_KEY"]
limits:
  max_inflight: $((STREAMS + 1024))
log:
  level: warn
YAML
    local i
    for i in $(seq 1 100); do port_free "$MEM_SIM_PORT" || break; sleep 0.05; done
    local unset=() v
    for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset+=(-u "$v"); done   # env vars are config too
    env "${unset[@]}" RUST_LOG=warn "$SERVER" --config "$OUT/mem-proxy.yaml" >"$OUT/mem-proxy.log" 2>&1 &
    PROXY_PID=$!; STARTED+=("$PROXY_PID")
    for i in $(seq 1 200); do   # 20 s
        kill -0 "$PROXY_PID" 2>/dev/null || { tail -5 "$OUT/mem-proxy.log" >&2; return 1; }
        code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
            -H "Authorization: Bearer $CLIENT_KEY" \
            -d '{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}' \
            "http://127.0.0.1:$MEM_PROXY_PORT/v1/chat/completions" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    log "proxy not ready"; return 1
}
stop_pair() { [[ -n ${PROXY_PID:-} ]] && stop_pid "$PROXY_PID"; [[ -n ${SIM_PID:-} ]] && stop_pid "$SIM_PID"; PROXY_PID=""; SIM_PID=""; }

MEM_SUMMARY=""
measure_memory() {   # runs in this shell (not a pipeline) so STARTED and the trap see its PIDs
    local idle after hwm base peak=0 fds_at_peak=0 maxfds=0 r fds i open_rss
    echo "proxypal-server rev $REV, $(date -u +%FT%TZ)"
    if start_pair --fast; then
        sleep 1
        idle=$(kb VmRSS "$PROXY_PID")
        BENCH_CLIENT_KEY=$CLIENT_KEY timeout 30 wrk -t2 -c64 -d5s --timeout 10s -s "$ROOT/benches/peers/lua/post.lua" \
            "http://127.0.0.1:$MEM_PROXY_PORT/v1/chat/completions" >"$OUT/mem-wrk.txt" 2>&1 || true
        sleep 1
        after=$(kb VmRSS "$PROXY_PID"); hwm=$(kb VmHWM "$PROXY_PID")
        echo "idle VmRSS kB: $idle"
        echo "after 5 s of wrk c=64: VmRSS kB $after, VmHWM kB $hwm; wrk: $(sed -n 's/^WRKJSON //p' "$OUT/mem-wrk.txt")"
        MEM_SUMMARY+=" rss_idle_mb=$(mb "$idle") rss_after_load_mb=$(mb "$after")"
    else
        echo "idle: the proxy did not start"
    fi
    stop_pair
    # STREAMS streams of 200 chunks 100 ms apart (20 s each), all opened at once.
    if start_pair --fast --chunks 200 --chunk-interval-ms 100; then
        sleep 1
        base=$(kb VmRSS "$PROXY_PID")
        BENCH_CLIENT_KEY=$CLIENT_KEY timeout 90 "$SSE_LOAD" "http://127.0.0.1:$MEM_PROXY_PORT/v1/chat/completions" \
            -n "$STREAMS" -c "$STREAMS" --timeout 60 --interval-ms 100 >"$OUT/mem-sse.json" 2>"$OUT/mem-sse.err" &
        LOAD_PID=$!; STARTED+=("$LOAD_PID")
        for i in $(seq 1 80); do   # sample for up to 16 s, while the 20 s streams are open
            sleep 0.2
            kill -0 "$LOAD_PID" 2>/dev/null || break
            r=$(kb VmRSS "$PROXY_PID"); fds=$(ls "/proc/$PROXY_PID/fd" 2>/dev/null | wc -l)
            ((fds > maxfds)) && maxfds=$fds
            if ((r > peak)); then peak=$r; fds_at_peak=$fds; fi
        done
        open_rss=$(kb VmRSS "$PROXY_PID")
        wait "$LOAD_PID" 2>/dev/null || true
        stop_pid "$LOAD_PID"
        hwm=$(kb VmHWM "$PROXY_PID")
        echo "before the streams: VmRSS kB $base"
        echo "$STREAMS open streams: peak sampled VmRSS kB $peak (proxy fds then $fds_at_peak, max $maxfds), VmRSS at the end of sampling $open_rss, VmHWM kB $hwm"
        echo "sse-load: $(cat "$OUT/mem-sse.json")"
        sleep 2
        echo "2 s after the streams ended: VmRSS kB $(kb VmRSS "$PROXY_PID")"
        # VmHWM is folded from per-CPU counters lazily: take the larger of it and the sampled peak
        ((peak > hwm)) && hwm=$peak
        MEM_SUMMARY+=" rss_${STREAMS}_streams_mb=$(mb "$hwm") $(python3 - "$OUT/mem-sse.json" "$STREAMS" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(f"streams_ok={d['ok']}/{d['n']}")
except Exception:
    print(f"streams_ok=0/{sys.argv[2]}")
PY
)"
    else
        echo "streams: the proxy did not start"
    fi
    stop_pair
}
if [[ $MEM == 1 ]]; then
    log "memory: idle, after a short load, with $STREAMS open streams"
    measure_memory >"$OUT/mem.txt" 2>&1 || log "WARNING: memory step failed"
    cat "$OUT/mem.txt" >&2
fi

# ----------------------------------------------------------------- binary ---
bin_bytes=$(stat -c %s "$SERVER")
stripped=$(file -b "$SERVER" 2>/dev/null | grep -o 'not stripped\|stripped' | head -1 || true)
echo "binary: $SERVER $bin_bytes bytes (${stripped:-unknown})" | tee "$OUT/binary.txt" >&2
BIN_SUMMARY="bin_mb=$(awk -v b="$bin_bytes" 'BEGIN{printf "%.2f", b/1048576}')"

# ---------------------------------------------------------------- summary ---
[[ -s $OUT/results.md ]] && log "peer tables: $OUT/results.md"
SUMMARY="SUMMARY rev=$REV bin_sha=$BIN_SHA repeat=$REPEAT $PEER_SUMMARY $MEM_SUMMARY $BIN_SUMMARY $QUOTA_SUMMARY"
SUMMARY=$(echo "$SUMMARY" | tr -s ' ')
echo "$SUMMARY" >"$OUT/summary.txt"
log "results: $OUT"
echo "$SUMMARY"
