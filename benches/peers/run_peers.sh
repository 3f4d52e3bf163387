#!/usr/bin/env bash
# run_peers.sh - measure the HTTP reverse-proxy overhead of peer systems on this
# machine, with ProxyPal side by side in the same run.
# Folded in from the team's shared peer benchmark (shared/bench/); see README.md.
# The one-command wrapper is ../run.sh (builds, runs this, the quota test, memory).
#
#   ./run_peers.sh            # set up what is missing, run everything, print tables
#   ./run_peers.sh --setup    # only install/build (apt nginx wrk, venv+LiteLLM, mock)
#   ./run_peers.sh --report DIR [DIR...]   # re-print tables of earlier runs
#
# What runs (all on 127.0.0.1, every server started here by PID and stopped by PID):
#   mock A  nginx, fixed chat.completion JSON (~400 B)        127.0.0.1:18000
#   mock B  mock/ (Rust): 20 SSE chunks 10 ms apart + [DONE]  127.0.0.1:18001
#   targets, all started at the beginning of each phase with its upstream base URL:
#     direct    no proxy: the load goes straight to the mock
#     nginx     nginx reverse proxy, rotates 3 fake keys      127.0.0.1:18010
#     litellm   LiteLLM proxy, 3 deployments, simple-shuffle  127.0.0.1:18020
#     proxypal  placeholder, see start_proxypal below        127.0.0.1:$PROXYPAL_PORT
#   phase "http":   wrk POST at concurrency 1 and 64, WARMUP s then DURATION s each
#   phase "stream": curl -N x STREAM_RUNS, sse-load 1-by-1, 2 bursts of STREAM_CONC at once
#   Each phase does REPEAT rounds (default 1); a round measures every target in
#   turn, so with REPEAT>1 the targets are interleaved and report.py takes medians.
#
# By default the measuring part re-runs itself inside a fresh network namespace
# (unshare -n) that has only a loopback interface, so no byte can leave the
# machine and the ports are free. BENCH_NETNS=0 runs on the host's loopback.
#
# Adding a target: write start_<name> PORT UPSTREAM_BASE LOGFILE (start ONE
# foreground process in the background and set TARGET_PID), set
# TARGET_PORT[<name>], and list <name> in TARGETS.
#
# Knobs (env): TARGETS DURATION WARMUP CONCS STREAM_RUNS STREAM_CONC REPEAT NGINX_PROXY_WORKERS
#              LITELLM_SPEC LITELLM_CONSTRAINTS LITELLM_NUM_WORKERS
#              PROXYPAL_BIN PROXYPAL_PORT PROXYPAL_ARGS
#              BENCH_NETNS BENCH_MAX_S BENCH_NETAUDIT LABEL
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Installed tools, builds and results go to BENCH_LOCAL (default: .local beside this
# script, or a temp folder when this folder is read-only).
if [[ -n "${BENCH_LOCAL:-}" ]]; then LOCAL=$BENCH_LOCAL
elif [[ -w "$BENCH_DIR" ]]; then LOCAL=$BENCH_DIR/.local
else LOCAL=${TMPDIR:-/tmp}/proxypal-bench; fi
mkdir -p "$LOCAL"
VENV=$LOCAL/venv
export CARGO_TARGET_DIR=$LOCAL/target
MOCK_SSE=$CARGO_TARGET_DIR/release/mock-sse
SSE_LOAD=$CARGO_TARGET_DIR/release/sse-load

LITELLM_SPEC=${LITELLM_SPEC:-'litellm[proxy]==1.108.7'}   # the version measured in RESULTS.md
# pip constraints (pip freeze of the measured venv); set to "" with another LITELLM_SPEC
LITELLM_CONSTRAINTS=${LITELLM_CONSTRAINTS-$BENCH_DIR/conf/litellm-constraints.txt}
DURATION=${DURATION:-15}
REPEAT=${REPEAT:-1}                             # rounds; targets are interleaved in each
WARMUP=${WARMUP:-3}
CONCS=${CONCS:-"1 64"}
STREAM_RUNS=${STREAM_RUNS:-20}
STREAM_CONC=${STREAM_CONC:-200}
NGINX_PROXY_WORKERS=${NGINX_PROXY_WORKERS:-1}
LITELLM_NUM_WORKERS=${LITELLM_NUM_WORKERS:-}   # empty = LiteLLM's own default (1)
BENCH_MAX_S=${BENCH_MAX_S:-2400}                # hard cap for the whole measuring part
PROXYPAL_PORT=${PROXYPAL_PORT:-18030}

MOCK_A_PORT=18000
MOCK_B_PORT=18001
declare -A TARGET_PORT=(
    [nginx]=18010
    [litellm]=18020
    [proxypal]=$PROXYPAL_PORT
)
if [[ -z "${TARGETS:-}" ]]; then
    TARGETS="direct nginx litellm"
    if [[ -n "${PROXYPAL_BIN:-}" ]]; then TARGETS="$TARGETS proxypal"; fi
fi

BODY='{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY='{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}],"stream":true}'

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ setup ---
setup() {
    local need=()
    command -v nginx >/dev/null || need+=(nginx)
    command -v wrk >/dev/null || need+=(wrk)
    command -v curl >/dev/null || need+=(curl)
    command -v unshare >/dev/null || need+=(util-linux)
    command -v ip >/dev/null || need+=(iproute2)
    if ((${#need[@]})); then
        log "apt-get install ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    # LiteLLM (slow to install) only when it is measured.
    if [[ " $TARGETS " == *" litellm "* && ! -x $VENV/bin/litellm ]]; then
        log "creating $VENV and installing $LITELLM_SPEC"
        mkdir -p "$LOCAL"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q "$LITELLM_SPEC" ${LITELLM_CONSTRAINTS:+-c "$LITELLM_CONSTRAINTS"}
    fi
    log "building mock/ (mock-sse, sse-load)"
    (cd "$BENCH_DIR/mock" && cargo build --release -q)
}

# ------------------------------------------------------------ process mgmt ---
STARTED=()   # PIDs this script started, stopped in reverse order on exit

tree_pids() {   # PID and all its descendants
    local p=$1 c
    echo "$p"
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do tree_pids "$c"; done
}

stop_pid() {    # stop one process we started, and whatever it spawned, by PID
    local pid=$1 all p i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    all=$(tree_pids "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    for p in $all; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
    wait "$pid" 2>/dev/null || true
    local -a keep=()
    for p in "${STARTED[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}

cleanup() {
    local i pids=("${STARTED[@]}")
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ----------------------------------------------------------- /proc metrics ---
proc_cpu_ticks() {   # utime+stime of the whole tree, in clock ticks
    local t=0 p s f
    for p in $(tree_pids "$1"); do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }                       # drop "pid (comm) "
        read -r -a f <<<"$s"
        t=$((t + f[11] + f[12]))          # fields 14 and 15 of stat
    done
    echo "$t"
}
proc_mem_kb() {      # sum of a /proc/PID/status field (VmHWM, VmRSS) over the tree
    local field=$1 t=0 p v
    for p in $(tree_pids "$2"); do
        v=$(awk -v f="$field:" '$1==f{print $2}' "/proc/$p/status" 2>/dev/null)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------------ mocks ---
start_mock_a() {
    local prefix=$RUN_DIR/nginx-mock-a
    mkdir -p "$prefix/logs" "$prefix/tmp"
    port_free $MOCK_A_PORT || die "port $MOCK_A_PORT busy"
    nginx -p "$prefix/" -c "$BENCH_DIR/conf/mock-a.nginx.conf" -e "$prefix/logs/error.log" \
        >"$LOGS/mock-a.log" 2>&1 &
    MOCK_A_PID=$!; STARTED+=("$MOCK_A_PID")
}
start_mock_b() {
    port_free $MOCK_B_PORT || die "port $MOCK_B_PORT busy"
    "$MOCK_SSE" "127.0.0.1:$MOCK_B_PORT" >"$LOGS/mock-b.log" 2>&1 &
    MOCK_B_PID=$!; STARTED+=("$MOCK_B_PID")
}

# ---------------------------------------------------------------- targets ---
# start_<target> PORT UPSTREAM_BASE LOGFILE: start one process in the
# background, set TARGET_PID. UPSTREAM_BASE is like http://127.0.0.1:18000/v1

start_nginx() {
    local port=$1 upstream=$2 logf=$3
    local hostport=${upstream#http://}; hostport=${hostport%%/*}
    local prefix=$RUN_DIR/nginx-proxy-$port-${hostport##*:}
    mkdir -p "$prefix/logs" "$prefix/tmp"
    sed -e "s|@PORT@|$port|g" -e "s|@UPSTREAM@|$hostport|g" -e "s|@WORKERS@|$NGINX_PROXY_WORKERS|g" \
        "$BENCH_DIR/conf/proxy.nginx.conf.tmpl" >"$prefix/nginx.conf"
    nginx -p "$prefix/" -c "$prefix/nginx.conf" -e "$prefix/logs/error.log" >"$logf" 2>&1 &
    TARGET_PID=$!
}

start_litellm() {
    local port=$1 upstream=$2 logf=$3
    local dir=$RUN_DIR/litellm-$port-${upstream//[^0-9]/_}
    mkdir -p "$dir/home"
    sed -e "s|@UPSTREAM_BASE@|$upstream|g" "$BENCH_DIR/conf/litellm.yaml.tmpl" >"$dir/config.yaml"
    local workers=() audit=()
    [[ -n $LITELLM_NUM_WORKERS ]] && workers=(--num_workers "$LITELLM_NUM_WORKERS")
    [[ ${BENCH_NETAUDIT:-0} == 1 ]] && audit=(PYTHONPATH="$BENCH_DIR/tools/netaudit" NETAUDIT_LOG="${logf%.log}.netaudit.log")
    # Clean environment. Offline switches: every remote fetch LiteLLM has is
    # turned to its bundled copy (only the model cost map is fetched at start-up;
    # the rest are fetched lazily by features not used here), Hugging Face is
    # offline (see disable_hf_tokenizer_download in the config), telemetry is
    # vetoed. This LiteLLM refuses to start without a master key, so the
    # per-run random client key is the master key. No DATABASE_URL: no DB.
    # BENCH_NETAUDIT=1 logs any non-loopback lookup/connect to logs/*.netaudit.log.
    (cd "$dir" && exec env -i PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" HOME="$dir/home" LANG=C.UTF-8 \
        NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
        LITELLM_LOCAL_MODEL_COST_MAP=True \
        LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True \
        LITELLM_LOCAL_BLOG_POSTS=True \
        LITELLM_LOCAL_POLICY_TEMPLATES=True \
        LITELLM_LOCAL_AUTOROUTER_PRESETS=True \
        LITELLM_TELEMETRY_DISABLED=true \
        HF_HUB_OFFLINE=1 \
        LITELLM_MASTER_KEY="$BENCH_CLIENT_KEY" "${audit[@]}" \
        "$VENV/bin/litellm" --config "$dir/config.yaml" --host 127.0.0.1 --port "$port" "${workers[@]}") \
        >"$logf" 2>&1 &
    TARGET_PID=$!
}

# ======================= ProxyPal ============================================
# Uses the config contract of the ProxyPal issues: a YAML file with listen,
# upstream.base_url, keys, rate_limit (set far above the load so it never binds)
# and auth.tokens (every load generator sends "Authorization: Bearer
# $BENCH_CLIENT_KEY", so ProxyPal checks a client token like LiteLLM does).
# Extra CLI arguments: PROXYPAL_ARGS.
start_proxypal() {
    local port=$1 upstream=$2 logf=$3
    if [[ -z "${PROXYPAL_BIN:-}" || ! -x "${PROXYPAL_BIN}" ]]; then
        log "proxypal: set PROXYPAL_BIN to the built server binary"; return 1
    fi
    local cfg=${logf%.log}.yaml
    cat >"$cfg" <<YAML
listen: "127.0.0.1:$port"
upstream:
  base_url: "$upstream"
keys:
  - fake-key-1
  - fake-key-2
  - fake-key-3
rate_limit:
  requests_per_minute: 100000000
  burst: 100000000
auth:
  tokens: ["$BENCH_CLIENT_KEY"]
YAML
    local args=()
    [[ -n "${PROXYPAL_ARGS:-}" ]] && read -r -a args <<<"$PROXYPAL_ARGS"
    # The server reads every PROXYPAL_* variable as config and rejects unknown
    # ones, so this harness's own PROXYPAL_BIN/PORT/ARGS must not reach it.
    local unset=() v
    for v in $(compgen -e); do [[ $v == PROXYPAL_* ]] && unset+=(-u "$v"); done
    env "${unset[@]}" RUST_LOG="${RUST_LOG:-warn}" "$PROXYPAL_BIN" --config "$cfg" "${args[@]}" >"$logf" 2>&1 &
    TARGET_PID=$!
}
# =============================================================================

# Start target $1 for phase $2 (http|stream): sets TPIDS[$1] ("" for direct),
# TURLS[$1] (base URL) and TREADY[$1] (seconds to the first good reply).
declare -A TPIDS=() TURLS=() TREADY=()
start_target() {
    local t=$1 phase=$2 upstream_port port
    [[ $phase == http ]] && upstream_port=$MOCK_A_PORT || upstream_port=$MOCK_B_PORT
    TPIDS[$t]=""; TREADY[$t]=0
    if [[ $t == direct ]]; then
        TURLS[$t]="http://127.0.0.1:$upstream_port"
        return 0
    fi
    port=${TARGET_PORT[$t]:?no TARGET_PORT for $t}
    port_free "$port" || die "port $port busy"
    TARGET_PID=""
    local t0=$EPOCHREALTIME
    "start_$t" "$port" "http://127.0.0.1:$upstream_port/v1" "$LOGS/$t.$phase.log" || return 1
    TPIDS[$t]=$TARGET_PID; STARTED+=("$TARGET_PID")
    TURLS[$t]="http://127.0.0.1:$port"
    wait_ready "${TURLS[$t]}" "$TARGET_PID" "$LOGS/$t.$phase.log" || return 1
    TREADY[$t]=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
    log "$t ($phase) ready in ${TREADY[$t]}s, pid $TARGET_PID"
}

# Start every target for a phase (all listen at once on their own ports; an
# idle LiteLLM uses ~0.3% of a core), leaving the names of those up in UP.
start_all() {
    local t phase=$1
    UP=()
    for t in $TARGETS; do
        if start_target "$t" "$phase"; then
            UP+=("$t")
        else
            json_line "{\"kind\":\"fail\",\"target\":\"$t\",\"phase\":\"$phase\"}"
            if [[ -n ${TPIDS[$t]:-} ]]; then stop_pid "${TPIDS[$t]}"; fi
        fi
    done
}

stop_all() {
    local t phase=$1
    for t in "${UP[@]}"; do
        if [[ -n ${TPIDS[$t]} ]]; then stop_pid "${TPIDS[$t]}"; fi
        netaudit_note "$t" "$phase"
    done
}

cpu_of() { [[ -n ${TPIDS[$1]} ]] && proc_cpu_ticks "${TPIDS[$1]}" || echo 0; }

# Wait (at most 60 s) until target $1 is idle again: wrk leaves requests in
# flight when it stops, and a slow proxy goes on working through them after
# the client has gone, eating the next measurement's window and CPU.
quiesce() {
    local t=$1 a b i
    [[ -n ${TPIDS[$t]} ]] || return 0
    a=$(cpu_of "$t")
    for ((i = 0; i < 120; i++)); do
        sleep 0.5
        b=$(cpu_of "$t")
        (( b - a <= CLK_TCK / 50 )) && return 0   # under 4% of a core
        a=$b
    done
    log "WARNING: $t still busy 60 s after the load stopped"
}
ticks_to_s() { awk -v d="$1" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", d/h}'; }

post() {   # post URL BODY OUTFILE -> prints http code
    curl -s -m 10 -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' \
        -H "Authorization: Bearer $BENCH_CLIENT_KEY" -d "$2" "$1" 2>/dev/null || true
}

wait_ready() {   # poll until a chat request succeeds (bounded), or the process dies
    local base=$1 pid=$2 logf=$3 i code
    for ((i = 0; i < 720; i++)); do   # 180 s
        kill -0 "$pid" 2>/dev/null || { tail -20 "$logf" >&2; log "process $pid died"; return 1; }
        code=$(post "$base/v1/chat/completions" "$BODY" "$RUN_DIR/ready.out")
        if [[ $code == 200 ]] && grep -q '"chat.completion"' "$RUN_DIR/ready.out"; then return 0; fi
        sleep 0.25
    done
    tail -20 "$logf" >&2; log "not ready after 180 s: $base"; return 1
}

smoke_keys() {   # which upstream keys did the target send? (mock A echoes them in the reply)
    local base=$1 i keys=""
    for i in $(seq 1 30); do
        post "$base/v1/chat/completions" "$BODY" "$RUN_DIR/keys.out" >/dev/null
        keys+="$(grep -o 'auth: Bearer [A-Za-z0-9_-]*' "$RUN_DIR/keys.out" | sed 's/auth: Bearer //;s/^sk-bench-.*/client-key/') "
    done
    echo "$keys" | tr ' ' '\n' | sort | uniq -c | awk 'NF==2{printf "%s%s×%s", s, $2, $1; s=" "}'
}

# ------------------------------------------------------------------ phases ---
json_line() { printf '%s\n' "$*" >>"$RESULTS"; }

NETAUDIT_TARGETS="litellm"   # Python targets that load tools/netaudit when BENCH_NETAUDIT=1
netaudit_note() {   # with BENCH_NETAUDIT=1: how many non-loopback lookups/connects did $1 try?
    [[ ${BENCH_NETAUDIT:-0} == 1 && " $NETAUDIT_TARGETS " == *" $1 "* ]] || return 0
    local file=$LOGS/$1.$2.netaudit.log n=0
    [[ -f $file ]] && n=$(grep -c '^\[' "$file" || true)
    [[ $n == 0 ]] || log "WARNING: $1 ($2) tried $n non-loopback lookups/connects, see $file"
    json_line "{\"kind\":\"netaudit\",\"target\":\"$1\",\"phase\":\"$2\",\"events\":$n}"
}

phase_http() {
    local t conc th url out cpu0 cpu1 wj rep
    local -A keys=() rss_idle=()
    log "phase http: starting $TARGETS with upstream mock A"
    start_all http
    for t in "${UP[@]}"; do
        keys[$t]=$(smoke_keys "${TURLS[$t]}")
        rss_idle[$t]=0; [[ -n ${TPIDS[$t]} ]] && rss_idle[$t]=$(proc_mem_kb VmRSS "${TPIDS[$t]}")
    done
    # REPEAT rounds; in each, every concurrency level, every target in turn
    # (interleaved, so slow drifts of this VM's speed hit all targets alike).
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for conc in $CONCS; do
            for t in "${UP[@]}"; do
                th=$((conc < 2 ? 1 : 2))
                url="${TURLS[$t]}/v1/chat/completions"
                log "$t http c=$conc round $rep/$REPEAT: warm-up ${WARMUP}s, measure ${DURATION}s"
                wrk -t"$th" -c"$conc" -d"${WARMUP}s" --timeout 10s -s "$BENCH_DIR/lua/post.lua" "$url" >"$LOGS/wrk.$t.c$conc.r$rep.warm.txt" 2>&1 || true
                quiesce "$t"
                cpu0=$(cpu_of "$t")
                out=$LOGS/wrk.$t.c$conc.r$rep.txt
                wrk -t"$th" -c"$conc" -d"${DURATION}s" --timeout 10s --latency -s "$BENCH_DIR/lua/post.lua" "$url" >"$out" 2>&1 || true
                cpu1=$(cpu_of "$t")   # CPU inside the window, as wrk's request count
                quiesce "$t"
                wj=$(sed -n 's/^WRKJSON //p' "$out")
                [[ -n $wj ]] || wj='{"requests":0}'
                json_line "{\"kind\":\"http\",\"target\":\"$t\",\"conc\":$conc,\"rep\":$rep,\"threads\":$th,\"proxy_cpu_s\":$(ticks_to_s $((cpu1 - cpu0))),\"wrk\":$wj}"
            done
        done
    done
    for t in "${UP[@]}"; do
        local hwm=0; [[ -n ${TPIDS[$t]} ]] && hwm=$(proc_mem_kb VmHWM "${TPIDS[$t]}")
        json_line "{\"kind\":\"proc\",\"target\":\"$t\",\"phase\":\"http\",\"ready_s\":${TREADY[$t]},\"rss_idle_kb\":${rss_idle[$t]},\"hwm_kb\":$hwm,\"keys\":\"${keys[$t]}\"}"
    done
    stop_all http
}

stream_round() {   # one round of streaming measurements of target $1 (round $2)
    local t=$1 rep=$2 url i cpu0 cpu1 b res one bursts="" curl_json
    url="${TURLS[$t]}/v1/chat/completions"
    log "$t stream round $rep/$REPEAT: $STREAM_RUNS x curl -N, $STREAM_RUNS x 1 stream, then 2 x $STREAM_CONC concurrent"
    local cf=$LOGS/curl.$t.r$rep.txt
    : >"$cf"
    for ((i = 0; i < STREAM_RUNS; i++)); do
        curl -s -N -m 15 -o /dev/null -w '%{time_starttransfer} %{time_total} %{http_code}\n' \
            -H 'Content-Type: application/json' -H "Authorization: Bearer $BENCH_CLIENT_KEY" \
            -d "$STREAM_BODY" "$url" >>"$cf" || echo "0 0 000" >>"$cf"
    done
    # raw per-run seconds; report.py takes the medians
    curl_json=$(awk '{a=a s $1; b=b s $2; c=c s "\"" $3 "\""; s=","}
        END{printf "{\"ttfb_s\":[%s],\"total_s\":[%s],\"codes\":[%s]}", a, b, c}' "$cf")
    one=$("$SSE_LOAD" "$url" -n "$STREAM_RUNS" -c 1 --timeout 30 --interval-ms "${MOCK_SSE_GAP_MS:-10}" 2>>"$LOGS/sse-load.$t.err")
    # Two bursts of STREAM_CONC streams at once: the 1st finds the proxy's
    # upstream pool cold (it must open ~STREAM_CONC upstream connections; in
    # later rounds the pool may still hold some), the 2nd, 1 s later, warm.
    for b in 1 2; do
        cpu0=$(cpu_of "$t")
        res=$("$SSE_LOAD" "$url" -n "$STREAM_CONC" -c "$STREAM_CONC" --timeout 60 --interval-ms "${MOCK_SSE_GAP_MS:-10}" 2>>"$LOGS/sse-load.$t.err")
        quiesce "$t"
        cpu1=$(cpu_of "$t")
        bursts+="${bursts:+,}{\"burst\":$b,\"proxy_cpu_s\":$(ticks_to_s $((cpu1 - cpu0))),\"r\":$res}"
        sleep 1
    done
    json_line "{\"kind\":\"stream\",\"target\":\"$t\",\"rep\":$rep,\"curl\":$curl_json,\"one\":$one,\"bursts\":[$bursts]}"
}

phase_stream() {
    local t url i smoke rep
    log "phase stream: starting $TARGETS with upstream mock B"
    start_all stream
    local -A ev=()
    for t in "${UP[@]}"; do
        url="${TURLS[$t]}/v1/chat/completions"
        smoke=$(curl -s -N -m 15 -H 'Content-Type: application/json' -H "Authorization: Bearer $BENCH_CLIENT_KEY" -d "$STREAM_BODY" "$url" || true)
        printf '%s\n' "$smoke" >"$LOGS/stream-smoke.$t.txt"
        ev[$t]=$(grep -c '^data: ' <<<"$smoke" || true)
        grep -q '^data: \[DONE\]' <<<"$smoke" || log "WARNING: $t stream smoke test saw no [DONE]"
        for i in 1 2; do   # warm-up (connection pools, lazy imports)
            curl -s -N -m 15 -o /dev/null -H 'Content-Type: application/json' -H "Authorization: Bearer $BENCH_CLIENT_KEY" -d "$STREAM_BODY" "$url" || true
        done
    done
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for t in "${UP[@]}"; do stream_round "$t" "$rep"; done
    done
    for t in "${UP[@]}"; do
        local hwm=0; [[ -n ${TPIDS[$t]} ]] && hwm=$(proc_mem_kb VmHWM "${TPIDS[$t]}")
        json_line "{\"kind\":\"proc\",\"target\":\"$t\",\"phase\":\"stream\",\"ready_s\":${TREADY[$t]},\"hwm_kb\":$hwm,\"smoke_events\":${ev[$t]:-0}}"
    done
    stop_all stream
}

versions() {
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "host: $(uname -sr), $(nproc) cores, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
        echo "netns: ${BENCH_IN_NETNS:-0}"
        echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
        echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
        echo "curl: $(curl --version | head -1 | awk '{print $2}')"
        if [[ -x $VENV/bin/python ]]; then
        echo "python (LiteLLM venv): $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
        "$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
for p in ["litellm", "uvicorn", "uvloop", "fastapi", "starlette", "openai", "httpx", "aiohttp", "pydantic"]:
    try:
        print(f"{p}: {m.version(p)}")
    except Exception:
        print(f"{p}: -")
EOF
        echo "litellm workers: ${LITELLM_NUM_WORKERS:-default = $(sed -n 's/^DEFAULT_NUM_WORKERS_LITELLM_PROXY.*, *\([0-9]*\)).*/\1/p' "$VENV"/lib/python3*/site-packages/litellm/constants.py | head -1) (uvicorn, one process)}"
        else
        echo "litellm: not installed"
        fi
        echo "nginx proxy workers: $NGINX_PROXY_WORKERS"
        echo "rustc (mock B, sse-load): $(rustc --version | awk '{print $2}')"
        echo "hyper (mock B): $(awk '/^name = "hyper"$/{getline; print $3}' "$BENCH_DIR/mock/Cargo.lock" | tr -d '"')"
        echo "proxypal: ${PROXYPAL_BIN:-not measured}"
        echo "settings: DURATION=$DURATION WARMUP=$WARMUP CONCS='$CONCS' STREAM_RUNS=$STREAM_RUNS STREAM_CONC=$STREAM_CONC REPEAT=$REPEAT TARGETS='$TARGETS'"
    } >"$RUN_DIR/versions.txt"
    if [[ -x $VENV/bin/pip ]]; then "$VENV/bin/pip" freeze >"$RUN_DIR/pip-freeze.txt" 2>/dev/null || true; fi
}

measure() {
    RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)${LABEL:+-$LABEL}}
    RUN_DIR=$LOCAL/results/$RUN_ID
    LOGS=$RUN_DIR/logs
    RESULTS=$RUN_DIR/results.jsonl
    mkdir -p "$LOGS"
    : >"$RESULTS"
    BENCH_CLIENT_KEY=sk-bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    export BENCH_CLIENT_KEY
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM
    log "run $RUN_ID -> $RUN_DIR (targets: $TARGETS)"
    versions

    start_mock_a
    start_mock_b
    wait_ready "http://127.0.0.1:$MOCK_A_PORT" "$MOCK_A_PID" "$LOGS/mock-a.log" || die "mock A not up"
    wait_ready "http://127.0.0.1:$MOCK_B_PORT" "$MOCK_B_PID" "$LOGS/mock-b.log" || die "mock B not up"

    phase_http
    phase_stream

    cleanup
    STARTED=()
    python3 "$BENCH_DIR/report.py" "$RUN_DIR" | tee "$RUN_DIR/results.md"
    log "done: $RUN_DIR"
}

# -------------------------------------------------------------------- main ---
case "${1:-}" in
--setup) setup; exit 0 ;;
--report) shift; exec python3 "$BENCH_DIR/report.py" "$@" ;;
--inner) shift
    [[ -n "${BENCH_IN_NETNS:-}" ]] && ip link set lo up
    measure; exit 0 ;;
"") ;;
*) die "unknown argument $1" ;;
esac

setup
if [[ "${BENCH_NETNS:-1}" == 1 ]] && unshare -n true 2>/dev/null; then
    export BENCH_IN_NETNS=1
    exec unshare -n -- timeout -s TERM -k 30 "$BENCH_MAX_S" bash "$0" --inner
else
    log "no network namespace: running on the host loopback"
    exec timeout -s TERM -k 30 "$BENCH_MAX_S" bash "$0" --inner
fi
