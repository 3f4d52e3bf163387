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
# the load. Prints one line per run, the medians, ratios to `off` (of the
# medians, and the median of each round's own ratio), the proxy process's
# CPU per request at c=32 (writer thread included; steadier than req/s on a
# VM whose speed drifts; PostgreSQL's server CPU too), the hypervisor's
# steal, and how
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
    psql "$PG_URL" -q -f "$ROOT/benches/ledger-reset.sql" >/dev/null
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

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, in clock ticks
steal_ticks() { awk 'NR == 1 {print $9}' /proc/stat; }
# Every PostgreSQL server process's CPU (the backend, WAL writer, checkpointer, …).
pg_ticks() { local p t=0; for p in $(pgrep -x postgres || true); do t=$(( t + $(cpu_ticks "$p" 2>/dev/null || echo 0) )); done; echo "$t"; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

run() {   # run MODE ROUND
    local mode=$1 round=$2 pid
    config "$mode" >"$OUT/$mode.yaml"
    local unset=() v
    for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset+=(-u "$v"); done
    env "${unset[@]}" "$SERVER" --config "$OUT/$mode.yaml" >"$OUT/$mode-$round.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/health" && break; sleep 0.05; done
    for c in 32 1; do
        # CPU the proxy process (writer thread included) and the machine's
        # hypervisor steal spent during the c=32 run: steadier than req/s.
        local before steal pg
        before=$(cpu_ticks "$pid") steal=$(steal_ticks) pg=$(pg_ticks)
        BENCH_CLIENT_KEY=$CLIENT_KEY wrk -t$(( c > 1 ? 2 : 1 )) -c$c -d"${SECS}s" --latency \
            -s "$ROOT/benches/peers/lua/post.lua" "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" \
            >"$OUT/$mode-$round-c$c.txt" 2>&1
        printf '%s round %s c=%s %s\n' "$mode" "$round" "$c" "$(sed -n 's/^WRKJSON //p' "$OUT/$mode-$round-c$c.txt")" \
            | tee -a "$OUT/summary.txt"
        if [[ $c == 32 ]]; then
            printf 'cpu %s %s %s %s %s\n' "$mode" "$round" $(( $(cpu_ticks "$pid") - before )) \
                $(( $(steal_ticks) - steal )) $(( $(pg_ticks) - pg )) >>"$OUT/summary.txt"
        fi
    done
    # A clean stop writes what is buffered.
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    for mode in "${MODES[@]}"; do run "$mode" "$round"; done
done
python3 - "$OUT/summary.txt" "$TICK_US" "${MODES[@]}" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
runs, cpu = {}, {}
for line in open(sys.argv[1]):
    if line.startswith("cpu "):
        _, mode, rnd, ticks, steal, pg = line.split()
        cpu[(mode, rnd)] = (int(ticks), int(steal), int(pg))
    elif "{" in line:
        mode, _, rnd, c = line.split()[:4]
        runs.setdefault((mode, c), []).append((rnd, json.loads(line[line.index("{"):])))
tick_us = int(sys.argv[2])
med = lambda mode, c, f: statistics.median(r[f] for _, r in runs[(mode, c)])
rps = lambda mode: {rnd: r["rps"] for rnd, r in runs[(mode, "c=32")]}
# The proxy's CPU (all its threads) per request at c=32.
cpu_us = lambda mode, i=0: statistics.median(
    cpu[(mode, rnd)][i] * tick_us / r["requests"] for rnd, r in runs[(mode, "c=32")] if (mode, rnd) in cpu)
base, base_cpu = med("off", "c=32", "rps"), cpu_us("off")
for mode in sys.argv[3:]:
    r = med(mode, "c=32", "rps")
    # Each round's ratio to `off` in the same round: the machine's drift
    # between rounds cancels out.
    paired = statistics.median(rps(mode)[k] / v for k, v in rps("off").items() if k in rps(mode))
    steal = statistics.median(s for (m, _), (_, s, _) in cpu.items() if m == mode) * tick_us / 1e6
    # PostgreSQL's server shares this machine: its CPU per request too.
    db = f", PostgreSQL server CPU {cpu_us(mode, 2):.1f} us/request" if mode == "postgres" else ""
    print(f"{mode}: c=32 {r:.0f} req/s ({r / base:.3f}x off; paired by round {paired:.3f}x), "
          f"proxy CPU {cpu_us(mode):.1f} us/request ({cpu_us(mode) / base_cpu:.3f}x){db}, steal {steal:.2f} s/run, "
          f"c=1 p50 {med(mode, 'c=1', 'p50_us'):.0f} us, p99 {med(mode, 'c=1', 'p99_us'):.0f} us")
PY
if command -v sqlite3 >/dev/null; then
    echo "sqlite rows: $(sqlite3 "$OUT/ledger.db" 'SELECT COALESCE(SUM(rows), 0) FROM proxypal_ledger_pages')" | tee -a "$OUT/summary.txt"
fi
if [[ " ${MODES[*]} " == *" postgres "* ]]; then
    echo "postgres rows: $(psql "$PG_URL" -qtAc 'SELECT COALESCE(SUM(rows), 0) FROM proxypal_ledger_pages')" | tee -a "$OUT/summary.txt"
fi
grep -h "requests" "$OUT"/*-c*.txt | awk '/requests in/ {n += $1} END {print "requests sent in all runs: " n}' | tee -a "$OUT/summary.txt"
log "output in $OUT"
