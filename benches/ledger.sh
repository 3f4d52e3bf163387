#!/usr/bin/env bash
# benches/ledger.sh - what recording every request in the usage ledger costs.
#
#   bash benches/ledger.sh          # ROUNDS=3 SECS=5 KEYS=100
#
# Starts `nim-sim --fast` and proxypal-server three ways over the same keys:
# `off` (ledger.enabled: false), `sqlite` (the default: a file beside the
# state file) and `postgres` (PG_URL, default the machine's
# postgres://postgres@127.0.0.1:5432/test; the mode is left out, and says so,
# when it does not answer). Each round runs them in alternation (off,
# sqlite, postgres, off, …: every mode sees the same machine) with wrk at
# concurrency 32 (requests per second) and 1 (latency). Limits are far above
# the load. Prints one line per run, the medians, ratios to `off`, and how
# many rows each ledger holds afterwards (every request recorded); output in
# $BENCH_LOCAL/ledger/<time>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
KEYS=${KEYS:-100}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
BENCH_LOCAL=${BENCH_LOCAL:-$ROOT/benches/peers/.local}
OUT=$BENCH_LOCAL/ledger/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
SIM_PORT=18310 PROXY_PORT=18312
CLIENT_KEY=sk-bench-ledger
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
command -v wrk >/dev/null || { apt-get update -qq; apt-get install -y -qq wrk >/dev/null; }
STARTED=()
cleanup() { for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

MODES=(off sqlite)
if command -v psql >/dev/null && psql "$PG_URL" -qtAc 'SELECT 1' >/dev/null 2>&1; then
    psql "$PG_URL" -qc 'DROP TABLE IF EXISTS proxypal_ledger, proxypal_ledger_batches, proxypal_ledger_migrations, proxypal_ledger_names CASCADE' >/dev/null
    MODES+=(postgres)
else
    log "postgres mode left out: $PG_URL does not answer (set PG_URL)"
fi

log "cargo build --release -p proxypal-server -p proxypal-nim-sim"
cargo build --release -q -p proxypal-server -p proxypal-nim-sim
SERVER=$ROOT/target/release/proxypal-server
"$ROOT/target/release/nim-sim" --listen "127.0.0.1:$SIM_PORT" --fast >"$OUT/sim.log" 2>&1 &
STARTED+=($!)

keys=$(for i in $(seq 1 "$KEYS"); do printf '"nvapi-bench-ledger-%06d",' "$i"; done)
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
  path: "$OUT/state-$1.db"
log:
  level: warn
YAML
    case $1 in
        off) printf 'ledger:\n  enabled: false\n' ;;
        sqlite) printf 'ledger:\n  path: "%s/ledger.db"\n' "$OUT" ;;
        postgres) printf 'ledger:\n  backend: postgres\n  url: "%s"\n' "$PG_URL" ;;
    esac
}

run() {   # run MODE ROUND
    local mode=$1 round=$2 pid
    config "$mode" >"$OUT/$mode.yaml"
    local unset=() v
    for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset+=(-u "$v"); done
    env "${unset[@]}" "$SERVER" --config "$OUT/$mode.yaml" >"$OUT/$mode-$round.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/health" && break; sleep 0.05; done
    for c in 32 1; do
        BENCH_CLIENT_KEY=$CLIENT_KEY wrk -t$(( c > 1 ? 2 : 1 )) -c$c -d"${SECS}s" --latency \
            -s "$ROOT/benches/peers/lua/post.lua" "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" \
            >"$OUT/$mode-$round-c$c.txt" 2>&1
        printf '%s round %s c=%s %s\n' "$mode" "$round" "$c" "$(sed -n 's/^WRKJSON //p' "$OUT/$mode-$round-c$c.txt")" \
            | tee -a "$OUT/summary.txt"
    done
    # A clean stop writes what is buffered.
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    for mode in "${MODES[@]}"; do run "$mode" "$round"; done
done
python3 - "$OUT/summary.txt" "${MODES[@]}" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    if "{" not in line:
        continue
    mode, _, _, c = line.split()[:4]
    runs.setdefault((mode, c), []).append(json.loads(line[line.index("{"):]))
med = lambda mode, c, f: statistics.median(r[f] for r in runs[(mode, c)])
base = med("off", "c=32", "rps")
for mode in sys.argv[2:]:
    rps = med(mode, "c=32", "rps")
    print(f"{mode}: c=32 {rps:.0f} req/s ({rps / base:.3f}x off), c=1 p50 {med(mode, 'c=1', 'p50_us'):.0f} us, p99 {med(mode, 'c=1', 'p99_us'):.0f} us")
PY
if command -v sqlite3 >/dev/null; then
    echo "sqlite rows: $(sqlite3 "$OUT/ledger.db" 'SELECT COUNT(*) FROM proxypal_ledger')" | tee -a "$OUT/summary.txt"
fi
if [[ " ${MODES[*]} " == *" postgres "* ]]; then
    echo "postgres rows: $(psql "$PG_URL" -qtAc 'SELECT COUNT(*) FROM proxypal_ledger')" | tee -a "$OUT/summary.txt"
fi
grep -h "requests" "$OUT"/*-c*.txt | awk '/requests in/ {n += $1} END {print "requests sent in all runs: " n}' | tee -a "$OUT/summary.txt"
log "output in $OUT"
