#!/usr/bin/env bash
# WebSocket forwarding benchmark, loopback only:
#   loadgen -> [system under test] -> echo upstream (ws://127.0.0.1:9001/ws)
# See bench/README.md.
#
# Usage: bash bench/run.sh [--setup | --soak-tools] [target ...]
#   targets: direct nginx1 nginxauto haproxy gin twisted-relay gateway gateway-base
#            (default: $TARGETS, else "direct nginx1 haproxy gin twisted-relay", plus gateway when GATEWAY_CMD is set)
#   --setup: install the Debian packages and build the Go tools, then exit
#   --soak-tools: only what bench/soak needs (Go, gorilla/websocket; loadgen and echo), then exit
#                 (make test runs each soak scenario shortened: tests/integration/test_soak.py)
# Environment:
#   REPS=3                 repetitions; targets are interleaved within each repetition
#   SCENARIOS="d a b c e"  a b c l: ping-pong; d: idle connections; e: handshakes
#                          compression (permessage-deflate, not in the default): j: ping-pong of 16 KiB JSON,
#                          compressed; dz: idle connections after 3 compressed 1 KiB JSON echoes each;
#                          dj: the same as dz without compression (dz's baseline)
#   DUR=5 WARM=1           measured / warmup seconds of a ping-pong or handshake scenario
#   IDLE_N=5000            connections held open in scenario d
#   PIN=split|none         split: system under test on cpu1, loadgen and echo on cpu0
#   GATEWAY_CMD            command line starting the gateway; it gets UPSTREAM_URL in its environment
#   GATEWAY_URL            URL loadgen connects to for target gateway (ws:// or wss://, loopback)
#   BASE_GATEWAY_CMD       target gateway-base: another build of the gateway (e.g. a checkout of the
#                          commit before a change), on GATEWAY_URL too, interleaved with gateway in each rep
#   UPSTREAM_URL           fixed: ws://127.0.0.1:9001/ws, given to the gateway
#   PYTHON=python3         runs bench/report.py and the twisted-relay peer (needs Twisted: the repo's venv)
#   TWISTD                 only used to find that venv when PYTHON is not set
#   OUT=/tmp/bench/results-<time>.jsonl   raw results, one JSON line per target, scenario and repetition
#   BENCH_BIN=/tmp/wsgw-bench/bin         where the Go tools are built
# Output: progress on stderr, Markdown tables of medians (bench/report.py) on stdout.
set -u
BENCH=$(cd "$(dirname "$0")" && pwd)
BIN=${BENCH_BIN:-/tmp/wsgw-bench/bin}
if [ -z "${PYTHON:-}" ] && [ -n "${TWISTD:-}" ] && [ -x "$(dirname "$TWISTD")/python" ]; then
  PYTHON=$(dirname "$TWISTD")/python
fi
PYTHON=${PYTHON:-python3}
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-"d a b c e"}
DUR=${DUR:-5}
WARM=${WARM:-1}
IDLE_N=${IDLE_N:-5000}
PIN=${PIN:-split}
WORK=/tmp/bench
ECHO_PORT=9001
UPSTREAM_URL=ws://127.0.0.1:$ECHO_PORT/ws
export UPSTREAM_URL

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

SETUP_ONLY=0
SOAK_ONLY=0
if [ "${1:-}" = --setup ]; then SETUP_ONLY=1; shift; fi
if [ "${1:-}" = --soak-tools ]; then SETUP_ONLY=1; SOAK_ONLY=1; shift; fi
if [ $# -gt 0 ]; then TARGET_LIST="$*"
else
  TARGET_LIST=${TARGETS:-"direct nginx1 haproxy gin twisted-relay"}
  if [ -z "${TARGETS:-}" ] && [ -n "${GATEWAY_CMD:-}" ]; then TARGET_LIST="$TARGET_LIST gateway"; fi
fi

# ---------------------------------------------------------------- arguments
case $PIN in split|none) ;; *) die "PIN=$PIN: split or none" ;; esac
for n in "$REPS" "$DUR" "$WARM" "$IDLE_N"; do
  [[ $n =~ ^[0-9]+$ ]] || die "REPS, DUR, WARM and IDLE_N must be whole numbers"
done
{ [ "$REPS" -ge 1 ] && [ "$REPS" -le 20 ]; } || die "REPS=$REPS: 1..20"
{ [ "$DUR" -ge 1 ] && [ "$DUR" -le 120 ]; } || die "DUR=$DUR: 1..120 seconds"
[ "$WARM" -le 30 ] || die "WARM=$WARM: 0..30 seconds"
{ [ "$IDLE_N" -ge 1 ] && [ "$IDLE_N" -le 9000 ]; } || die "IDLE_N=$IDLE_N: 1..9000"
for sc in $SCENARIOS; do case $sc in a|b|c|d|e|l|j|dj|dz) ;; *) die "unknown scenario '$sc' (a b c d e l j dj dz)" ;; esac; done
for t in $TARGET_LIST; do
  case $t in direct|nginx1|nginxauto|haproxy|gin|twisted-relay|gateway|gateway-base) ;; *) die "unknown target '$t'" ;; esac
done
is_loopback_url() { [[ $1 =~ ^wss?://(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\]):[0-9]+(/|\?|$) ]]; }
if [[ " $TARGET_LIST " == *" gateway "* ]] && [ $SETUP_ONLY = 0 ]; then
  [ -n "${GATEWAY_CMD:-}" ] && [ -n "${GATEWAY_URL:-}" ] || die "target gateway needs GATEWAY_CMD and GATEWAY_URL"
  is_loopback_url "$GATEWAY_URL" || die "GATEWAY_URL must be a loopback ws:// or wss:// URL with a port"
fi
if [[ " $TARGET_LIST " == *" gateway-base "* ]] && [ $SETUP_ONLY = 0 ]; then
  [ -n "${BASE_GATEWAY_CMD:-}" ] && [ -n "${GATEWAY_URL:-}" ] || die "target gateway-base needs BASE_GATEWAY_CMD and GATEWAY_URL"
  is_loopback_url "$GATEWAY_URL" || die "GATEWAY_URL must be a loopback ws:// or wss:// URL with a port"
fi

# ---------------------------------------------------------------- Debian packages
missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -d /usr/share/gocode/src/github.com/gorilla/websocket ] || missing+=(golang-github-gorilla-websocket-dev)
if [ $SOAK_ONLY = 0 ]; then
  [ -d /usr/share/gocode/src/github.com/gin-gonic/gin ] || missing+=(golang-github-gin-gonic-gin-dev)
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v jq >/dev/null 2>&1 || missing+=(jq)
  command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing Debian packages: ${missing[*]} (log: /tmp/wsgw-bench-apt.log)"
    { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >/tmp/wsgw-bench-apt.log 2>&1 || die "apt-get install failed, see /tmp/wsgw-bench-apt.log"
  else
    die "missing Debian packages; run: sudo apt-get install -y ${missing[*]}"
  fi
fi
# packaged nginx/haproxy services are not what is measured: this harness starts its own
for svc in nginx haproxy; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    log "note: the system's $svc service is running (it is not measured; ports used here: 9001 9101 9201 9301 9401)"
  fi
done

# ---------------------------------------------------------------- Go tools (offline, GOPATH mode)
export GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode GOCACHE=/tmp/gocache GOFLAGS=
mkdir -p "$BIN"
TOOLS="loadgen echo gin-forwarder"
[ $SOAK_ONLY = 1 ] && TOOLS="loadgen echo"
for tool in $TOOLS; do
  if [ ! -x "$BIN/$tool" ] || [ -n "$(find "$BENCH/$tool" -name '*.go' -newer "$BIN/$tool")" ]; then
    log "building $BIN/$tool"
    (cd "$BENCH/$tool" && go build -o "$BIN/$tool" .) || die "go build $tool failed"
  fi
done
if [ $SETUP_ONLY = 1 ]; then log "setup done: Debian packages present, tools in $BIN"; exit 0; fi

"$PYTHON" -c 'import twisted' 2>/dev/null || [[ " $TARGET_LIST " != *" twisted-relay "* ]] \
  || die "$PYTHON cannot import twisted (set PYTHON to the repo's .venv/bin/python, or run make bench)"

ulimit -n 20000 2>/dev/null || die "cannot raise the open files limit to 20000 (scenario d needs it)"
mkdir -p "$WORK"
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$OUT"

if [ "$PIN" = split ]; then SUT_CPU="taskset -c 1"; LG_CPU="taskset -c 0"; UP_CPU="taskset -c 0"
else SUT_CPU=""; LG_CPU=""; UP_CPU=""; fi
HZ=$(getconf CLK_TCK)

# ---------------------------------------------------------------- process helpers
descendants() {  # a pid and every process below it
  local c; echo "$1"
  for c in $(pgrep -P "$1" 2>/dev/null); do descendants "$c"; done
}
cpu_ticks() {  # utime + stime, clock ticks, summed over the process trees of the given pids
  local sum=0 r p v
  for r in "$@"; do for p in $(descendants "$r"); do
    v=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null) && sum=$((sum + ${v:-0}))
  done; done
  echo $sum
}
rss_kb() {  # resident memory, KiB, summed over the process trees of the given pids
  local sum=0 r p v
  for r in "$@"; do for p in $(descendants "$r"); do
    v=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$p/status" 2>/dev/null) && sum=$((sum + ${v:-0}))
  done; done
  echo $sum
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_free() {  # something else listening there would be measured instead
  if port_open "$1"; then log "port $1 is already taken by another process: not measuring there"; return 1; fi
}
wait_listening() {  # port pid: up to 15 s
  local i
  for i in $(seq 1 150); do
    port_open "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
stop() {  # pid: TERM, then KILL after 5 s
  local p=$1 i
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null
  for i in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null
  wait "$p" 2>/dev/null
  return 0
}

SUT_PID=""; ECHO_PID=""; IDLE_PID=""
NOT_NEGOTIATED=""  # target/scenario pairs of j or dz where permessage-deflate was not negotiated
stop_all() {
  stop "$IDLE_PID"; IDLE_PID=""
  stop "$SUT_PID"; SUT_PID=""
  stop "$ECHO_PID"; ECHO_PID=""
}
trap 'stop_all' EXIT
trap 'log "interrupted"; exit 130' INT TERM

start_echo() {  # cpu prefix
  port_free $ECHO_PORT || return 1
  # -compress: accepts a permessage-deflate offer (scenarios j, dz); nothing changes for a client that
  # offers none (every other scenario)
  $1 "$BIN/echo" -addr 127.0.0.1:$ECHO_PORT -compress >"$WORK/echo.log" 2>&1 &
  ECHO_PID=$!
  wait_listening $ECHO_PORT $ECHO_PID || { log "echo upstream did not start (see $WORK/echo.log)"; return 1; }
}

# start_target NAME: sets SUT_PID, URL and PORT (ECHO_PID when the target has an upstream)
start_target() {
  local name=$1 logf="$WORK/$1.log"
  case $name in
    direct)  # the echo itself is the system under test
      start_echo "$SUT_CPU" || return 1
      SUT_PID=$ECHO_PID; ECHO_PID=""; PORT=$ECHO_PORT; URL=$UPSTREAM_URL
      return 0 ;;
    gateway|gateway-base)
      PORT=$(sed -E 's#^wss?://[^/?]*:([0-9]+).*#\1#' <<<"$GATEWAY_URL"); URL=$GATEWAY_URL ;;
    nginx1|nginxauto) PORT=9101; URL=ws://127.0.0.1:$PORT/ws ;;
    gin) PORT=9201; URL=ws://127.0.0.1:$PORT/ws ;;
    twisted-relay) PORT=9301; URL=ws://127.0.0.1:$PORT/ws ;;
    haproxy) PORT=9401; URL=ws://127.0.0.1:$PORT/ws ;;
  esac
  port_free "$PORT" || return 1
  start_echo "$UP_CPU" || return 1
  case $name in
    nginx1|nginxauto)
      local workers=1 cpu=$SUT_CPU
      # 'auto' workers all pinned to one core would measure nothing useful: never pinned
      [ $name = nginxauto ] && { workers=auto; cpu=""; }
      mkdir -p "$WORK/nginx"
      sed -e "s#@WORKERS@#$workers#; s#@PORT@#$PORT#; s#@UPSTREAM@#127.0.0.1:$ECHO_PORT#; s#@PREFIX@#$WORK/nginx#g" \
        "$BENCH/peers/nginx.conf" >"$WORK/nginx/nginx.conf"
      $cpu nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$logf" 2>&1 & ;;
    haproxy)
      sed -e "s#@NBTHREAD@#1#; s#@PORT@#$PORT#; s#@UPSTREAM@#127.0.0.1:$ECHO_PORT#" \
        "$BENCH/peers/haproxy.cfg" >"$WORK/haproxy.cfg"
      $SUT_CPU haproxy -db -f "$WORK/haproxy.cfg" >"$logf" 2>&1 & ;;
    gin)
      $SUT_CPU "$BIN/gin-forwarder" -addr 127.0.0.1:$PORT -upstream "$UPSTREAM_URL" >"$logf" 2>&1 & ;;
    twisted-relay)
      $SUT_CPU "$PYTHON" "$BENCH/peers/twisted_relay.py" --port $PORT --upstream-port $ECHO_PORT >"$logf" 2>&1 & ;;
    gateway)
      $SUT_CPU bash -c "exec $GATEWAY_CMD" >"$logf" 2>&1 & ;;
    gateway-base)
      $SUT_CPU bash -c "exec $BASE_GATEWAY_CMD" >"$logf" 2>&1 & ;;
  esac
  SUT_PID=$!
  wait_listening "$PORT" "$SUT_PID" || { log "$name is not listening on $PORT (see $logf)"; return 1; }
}

check_path() {  # one connection through the whole path must echo without error
  local out
  out=$(timeout 30 $LG_CPU "$BIN/loadgen" -url "$URL" -insecure -c 1 -d 300ms -w 100ms 2>&1 | tail -1)
  [ "$(jq -r '.errors' <<<"$out" 2>/dev/null)" = 0 ] && [ "$(jq -r '.msgs' <<<"$out" 2>/dev/null)" != 0 ] && return 0
  log "functional check through $1 failed: $out"
  return 1
}

record() {  # target scenario rep extra-json; loadgen's JSON line on stdin
  jq -c --arg target "$1" --arg scenario "$2" --argjson rep "$3" --arg pin "$PIN" --argjson extra "$4" \
    '. + {target: $target, scenario: $scenario, rep: $rep, pin: $pin} + $extra' >>"$OUT"
}

describe() {
  case $1 in
    a) echo "50 conns, 64 B, 1 in flight" ;;
    b) echo "50 conns, 64 B, 16 in flight" ;;
    c) echo "10 conns, 64 KiB, 1 in flight" ;;
    l) echo "1 conn, 64 B, 1 in flight (unloaded latency)" ;;
    d) echo "$IDLE_N idle conns, RSS" ;;
    e) echo "handshakes, 20 dialers" ;;
    j) echo "10 conns, 16 KiB JSON text, 1 in flight, permessage-deflate" ;;
    dj) echo "$IDLE_N idle conns after 3 echoes of 1 KiB JSON each, RSS" ;;
    dz) echo "$IDLE_N idle conns after 3 echoes of 1 KiB JSON each, permessage-deflate, RSS" ;;
  esac
}

measure_load() {  # target scenario rep: ping-pong or handshake scenario
  local t=$1 sc=$2 rep=$3 args res s0 s1 e0 e1 t0 t1 extra
  case $sc in
    a) args="-mode pingpong -c 50 -s 64 -p 1" ;;
    b) args="-mode pingpong -c 50 -s 64 -p 16" ;;
    c) args="-mode pingpong -c 10 -s 65536 -p 1" ;;
    l) args="-mode pingpong -c 1 -s 64 -p 1" ;;
    e) args="-mode handshake -c 20" ;;
    j) args="-mode pingpong -c 10 -s 16384 -p 1 -payload json -compress" ;;
  esac
  s0=$(cpu_ticks "$SUT_PID"); e0=0; [ -n "$ECHO_PID" ] && e0=$(cpu_ticks "$ECHO_PID"); t0=$(date +%s.%N)
  res=$(timeout $((WARM + DUR + 90)) $LG_CPU "$BIN/loadgen" $args -url "$URL" -insecure -d "${DUR}s" -w "${WARM}s" | tail -1)
  s1=$(cpu_ticks "$SUT_PID"); e1=0; [ -n "$ECHO_PID" ] && e1=$(cpu_ticks "$ECHO_PID"); t1=$(date +%s.%N)
  jq -e . >/dev/null 2>&1 <<<"$res" || { log "$t $sc: loadgen gave no result"; return 1; }
  # CPU % over the whole loadgen run (connect, warmup, measure, close); 100 = one core
  extra=$(awk -v s="$((s1 - s0))" -v e="$((e1 - e0))" -v t0="$t0" -v t1="$t1" -v hz="$HZ" -v rss="$(rss_kb "$SUT_PID")" \
    'BEGIN { el = t1 - t0; printf "{\"sut_cpu_pct\":%.1f,\"echo_cpu_pct\":%.1f,\"sut_rss_kb\":%d}", 100*s/hz/el, 100*e/hz/el, rss }')
  if [ "$(jq -r '.compression_not_negotiated // 0' <<<"$res")" != 0 ]; then
    record "$t" "$sc" "$rep" '{}' <<<"$res"  # errors, no figure (not even the SUT's CPU)
    NOT_NEGOTIATED="$NOT_NEGOTIATED $t/$sc"
    log "    $t $sc: permessage-deflate was NOT negotiated ($(jq -r '.compression_not_negotiated' <<<"$res") connections;"\
      "Sec-WebSocket-Extensions: '$(jq -r '.extensions_header' <<<"$res")'): no figure recorded, errors > 0"
    return 1
  fi
  record "$t" "$sc" "$rep" "$extra" <<<"$res"
  log "    $(jq -c '{msgs_per_s, handshakes_per_s, p50_us, p99_us, errors, mismatches, deflate_ratio_l1, wire_ratio_in} | with_entries(select(.value != null))
    | with_entries(if (.value|type) == "number" then .value |= (. * 10 | round / 10) else . end)' <<<"$res") $extra"
}

measure_idle() {  # target rep scenario: d, dj or dz
  local t=$1 rep=$2 sc=${3:-d} before after open i extra notneg args="" ready="$WORK/idle-ready.json"
  case $sc in
    dj) args="-s 1024 -payload json -idlemsgs 3" ;;
    dz) args="-s 1024 -payload json -idlemsgs 3 -compress" ;;
  esac
  rm -f "$ready"
  before=$(rss_kb "$SUT_PID")
  $LG_CPU "$BIN/loadgen" -mode idle $args -url "$URL" -insecure -c "$IDLE_N" -hold 120s -readyfile "$ready" >"$WORK/idle.out" 2>&1 &
  IDLE_PID=$!
  for i in $(seq 1 900); do  # 90 s at most to open them
    [ -s "$ready" ] && break
    kill -0 "$IDLE_PID" 2>/dev/null || break
    sleep 0.1
  done
  sleep 2  # let the system under test settle
  after=$(rss_kb "$SUT_PID")
  open=$(jq -r '.connections' "$ready" 2>/dev/null || echo 0)
  stop "$IDLE_PID"; IDLE_PID=""
  [ -s "$ready" ] || { log "$t $sc: the idle connections never became ready (see $WORK/idle.out)"; return 1; }
  notneg=$(jq -r '.compression_not_negotiated // 0' "$ready" 2>/dev/null || echo 0)
  # without the compression asked for, the memory figure would be the uncompressed one: none is recorded
  extra=$(jq -nc --argjson b "$before" --argjson a "$after" --argjson n "${open:-0}" --argjson nn "${notneg:-0}" \
    '{sut_rss_before_kb: $b, sut_rss_idle_kb: $a,
      kib_per_conn_total: (if $n > 0 and $nn == 0 then $a / $n else null end),
      kib_per_conn_delta: (if $n > 0 and $nn == 0 then ($a - $b) / $n else null end)}')
  record "$t" "$sc" "$rep" "$extra" <"$ready"
  if [ "$notneg" != 0 ]; then
    NOT_NEGOTIATED="$NOT_NEGOTIATED $t/$sc"
    log "    $t $sc: permessage-deflate was NOT negotiated on $notneg of $open connections"\
      "(Sec-WebSocket-Extensions: '$(jq -r '.extensions_header' "$ready")'): no figure recorded, errors > 0"
  else
    log "    open=$open RSS ${before} kB -> ${after} kB $(jq -c '{kib_per_conn_total, kib_per_conn_delta} | map_values(. * 10 | round / 10)' <<<"$extra")"
  fi
  sleep 2  # let the closes drain
}

# ---------------------------------------------------------------- run
HEADER="# run.sh $(date -Is) PIN=$PIN REPS=$REPS DUR=$DUR WARM=$WARM IDLE_N=$IDLE_N targets=[$TARGET_LIST] scenarios=[$SCENARIOS]"
{
  echo "$HEADER"
  echo "# loadgen cpu: ${LG_CPU:-none}; SUT cpu: ${SUT_CPU:-none}; echo upstream cpu (proxy targets): ${UP_CPU:-none}"
} >&2
nsc=$(wc -w <<<"$SCENARIOS")
for rep in $(seq 1 "$REPS"); do
  for t in $TARGET_LIST; do
    log "== rep $rep/$REPS, target $t: starting"
    if ! start_target "$t" || ! check_path "$t"; then
      log "== rep $rep/$REPS, target $t: skipped"; stop_all; continue
    fi
    k=0
    for sc in $SCENARIOS; do
      k=$((k + 1))
      log "-- rep $rep/$REPS, target $t, scenario $sc ($k/$nsc): $(describe "$sc")"
      if [ $k -gt 1 ] && { [ "$sc" = dj ] || [ "$sc" = dz ]; }; then
        # dz is compared with dj: each on a fresh process, so that neither reuses what the other freed
        stop_all; sleep 1
        if ! start_target "$t" || ! check_path "$t"; then log "   $t: restart for $sc failed: skipped"; stop_all; continue; fi
      fi
      case $sc in d|dj|dz) measure_idle "$t" "$rep" "$sc" ;; *) measure_load "$t" "$sc" "$rep" ;; esac
      sleep 1
    done
    stop_all
    sleep 1
  done
done
trap - EXIT
log "raw results: $OUT"
[ -s "$OUT" ] || die "no results were recorded"
echo '```'
echo "$HEADER"
echo '```'
echo
"$PYTHON" "$BENCH/report.py" "$OUT"
if [ -n "$NOT_NEGOTIATED" ]; then
  # the tables are printed, and the run fails: a compression figure is missing
  log "error: permessage-deflate was NOT negotiated in:$NOT_NEGOTIATED (no figure for those; see above)"
  exit 3
fi
