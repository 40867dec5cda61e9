#!/usr/bin/env bash
# The cache benchmark: what the Redis read-through cache buys GetOrder, in one run.
# Builds a release tree, starts PostgreSQL (the private stack, or BENCH_STACK=0) and a
# private redis-server, and three orderd on a fresh database:
#   warm     cache on,  rate limits on (set too high to refuse: the limiter's Redis call
#            stays on the hot path, pipelined with the cache lookup)
#   nocache  cache off (ORDERD_CACHE_ENABLED=false), rate limits on
#   norl     cache on,  rate limits off (ORDERD_RATELIMIT_ENABLED=false): the limiter's cost
# Places BENCH_ORDERS orders, reads each through warm and norl until Redis holds them all,
# then at each concurrency, in BENCH_ROUNDS rounds (the order of the cells rotating from
# round to round, so that a disturbance does not always hit the same cell; the report
# takes each cell's median round), measures with orderd-bench (every response checked):
#   health   /grpc.health.v1.Health/Check on warm: the bare round trip of the same gRPC
#            stack with no work (no token, touches nothing: orderd's empty handler)
#   warm     GetOrder, cache warm            nocache  GetOrder, cache disabled
#   norl     GetOrder, cache warm, no rate limits
# and prints calls/s, p50/p99, the ratios warm/nocache and warm/health, and the CPU per
# call of orderd, Redis and PostgreSQL. Report: stdout and .local/bench/cache-<stamp>.md;
# raw outputs in .local/bench/cache-raw-<stamp>/. Everything it started is stopped.
# See bench/README.md ("The cache benchmark"). Knobs (environment):
#   BENCH_CONCURRENCY="1 8 32"  BENCH_ROUNDS=3  BENCH_DURATION=5s  BENCH_WARMUP=1s  BENCH_ORDERS=500
#   BENCH_CONNECTIONS=auto (min(concurrency, 8))  BENCH_THREADS=1  BENCH_WORKERS=(config's)
#   BENCH_PORT=50071 (warm; nocache +1, norl +2)  BENCH_REDIS_PORT=56391  BENCH_DB=orderd_bench_cache
#   BENCH_BUILD=1 (0: use BENCH_BUILD_DIR as it is)  BENCH_BUILD_DIR=build-bench
#   BENCH_STACK=1 (0: PostgreSQL already running on 127.0.0.1:BENCH_PG_PORT as BENCH_PG_USER)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

CONCURRENCY=${BENCH_CONCURRENCY:-"1 8 32"}
ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-5s}
WARMUP=${BENCH_WARMUP:-1s}
PORT=${BENCH_PORT:-50071}
REDIS_PORT=${BENCH_REDIS_PORT:-56391}
DB=${BENCH_DB:-orderd_bench_cache}
KEEP_DB=0 # the database is always dropped at the end
BUILD=${BENCH_BUILD_DIR:-$ROOT/build-bench}
case "$BUILD" in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
pg_settings
case "$ROUNDS" in *[!0-9]* | "" | 0) die "BENCH_ROUNDS must be a positive number" ;; esac
# Limits no run can reach: the limiter runs (and calls Redis) but never refuses.
HIGH=1000000/1000000

RAW=$OUT/cache-raw-$STAMP
REPORT=$OUT/cache-$STAMP.md
mkdir -p "$RAW"

# ---- clean-up: stop only what this script started ------------------------------------
declare -A PIDS=()  # instance name -> orderd pid
REDIS_PID=""
STARTED_PG=0
DB_CREATED=0
PSQL=psql

cleanup() {
  local rc=$? n
  for n in "${!PIDS[@]}"; do stop_pid "${PIDS[$n]}" "orderd $n"; done
  PIDS=()
  if [ -n "$REDIS_PID" ]; then stop_pid "$REDIS_PID" redis-server; fi
  cleanup_pg
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- CPU accounting (proc_ticks, machine_busy, pg_ticks: bench/lib.sh) -------------------
redis_info() { # redis_info FIELD: one integer field of INFO (0 if missing)
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" INFO all 2>/dev/null | tr -d '\r' |
    awk -F: -v k="$1" '$1 == k { print $2; found = 1 } END { if (!found) print 0 }'
}
# cpu_snapshot FILE PREFIX PID: orderd (PID), PostgreSQL, Redis, machine, Redis counters
cpu_snapshot() {
  {
    echo "$2_orderd=$(proc_ticks "$3")"
    echo "$2_pg=$(pg_ticks)"
    echo "$2_redis=$(proc_ticks "$REDIS_PID")"
    echo "$2_machine=$(machine_busy)"
    echo "$2_redis_cmds=$(redis_info total_commands_processed)"
    echo "$2_redis_hits=$(redis_info keyspace_hits)"
    echo "$2_redis_misses=$(redis_info keyspace_misses)"
    echo "$2_time=$(date +%s.%N)"
  } >>"$1"
}

# ---- 1. build ----------------------------------------------------------------------------
stage_begin "build (release, $BUILD)"
build_release
command -v redis-server >/dev/null || die "redis-server not found (scripts/deps.sh installs it)"
stage_end ok

# ---- 2. PostgreSQL, Redis, the database --------------------------------------------------
start_pg

stage_begin "redis-server on 127.0.0.1:$REDIS_PORT (private, no persistence)"
if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING >/dev/null 2>&1; then
  die "127.0.0.1:$REDIS_PORT already answers; set BENCH_REDIS_PORT to a free port"
fi
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --dir "$RAW" --logfile "$RAW/redis.log" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
for ((i = 0; i < 50; i++)); do
  [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING 2>/dev/null)" = PONG ] && break
  kill -0 "$REDIS_PID" 2>/dev/null || { REDIS_PID=""; die "redis-server exited (log: $RAW/redis.log)"; }
  sleep 0.1
done
[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING 2>/dev/null)" = PONG ] || die "redis-server does not answer"
stage_end "pid $REDIS_PID"

stage_begin "fresh database $DB"
fresh_db
export ORDERD_LOG_LEVEL=warn ORDERD_REDIS_HOST=127.0.0.1 ORDERD_REDIS_PORT="$REDIS_PORT"
export ORDERD_CACHE_ORDER_TTL=1h # no entry expires during the run
export ORDERD_RATELIMIT_CUSTOMER=$HIGH ORDERD_RATELIMIT_SERVICE=$HIGH ORDERD_RATELIMIT_ADMIN=$HIGH
export ORDERD_RATELIMIT_OVERRIDES="" ORDERD_RATELIMIT_REPLICAS=1
migrate_db
stage_end ok

# ---- 3. three orderd ---------------------------------------------------------------------
declare -A TARGET=([warm]="127.0.0.1:$PORT" [nocache]="127.0.0.1:$((PORT + 1))" [norl]="127.0.0.1:$((PORT + 2))")
# start_orderd NAME VAR=VALUE...: orderd serve with those settings; returns once SERVING.
start_orderd() {
  local name=$1 logf=$RAW/orderd-$1.log
  shift
  env ORDERD_SERVER_LISTEN="${TARGET[$name]}" ORDERD_CACHE_KEY_PREFIX="bench-$name:" "$@" \
    "$ORDERD" serve --config "$ROOT/config.yaml" >"$logf" 2>&1 &
  PIDS[$name]=$!
  wait_serving "${PIDS[$name]}" "${TARGET[$name]}" "$logf" "orderd $name" ||
    { unset "PIDS[$name]"; die "orderd $name exited at start (log: $logf)"; }
}

stage_begin "orderd: warm (${TARGET[warm]}), nocache (${TARGET[nocache]}), norl (${TARGET[norl]})"
start_orderd warm ORDERD_CACHE_ENABLED=true ORDERD_RATELIMIT_ENABLED=true
start_orderd nocache ORDERD_CACHE_ENABLED=false ORDERD_RATELIMIT_ENABLED=true
start_orderd norl ORDERD_CACHE_ENABLED=true ORDERD_RATELIMIT_ENABLED=false
tokens_and_products 2h "${TARGET[warm]}"
stage_end "pids warm ${PIDS[warm]}, nocache ${PIDS[nocache]}, norl ${PIDS[norl]}"

stage_begin "orders to read: $ORDERS through PlaceOrder; the caches of warm and norl filled"
place_orders "${TARGET[warm]}" "the orders"
for name in warm norl; do
  # Each id read twice (round robin): a miss fills the entry, the second read hits it.
  "$BENCH" --target "${TARGET[$name]}" --method get --token-file "$RAW/customer.token" \
    --order-ids-file "$RAW/order-ids.txt" --requests $((2 * ORDERS)) --warmup 0 --concurrency 8 \
    --connections 8 --quiet >"$RAW/fill-$name.txt" 2>&1 ||
    { cat "$RAW/fill-$name.txt" >&2; die "reading the orders through $name failed"; }
  n=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan --pattern "bench-$name:o:*" | wc -l)
  [ "$n" -ge "$ORDERS" ] || die "the cache of $name holds $n orders after the fill, not $ORDERS"
  echo "cached_$name=$n" >>"$RAW/cached.txt"
done
stage_end "$(tr '\n' ' ' <"$RAW/cached.txt")"

# ---- 4. measurements ------------------------------------------------------------------------
FAILED=0

# run_cell NAME INSTANCE METHOD C [extra args]: one orderd-bench run -> NAME.{json,txt,cpu}
run_cell() {
  local name=$1 inst=$2 method=$3 c=$4
  shift 4
  log "bench: $name: $method on $inst, concurrency $c, $(conns_for "$c") connections, $DURATION"
  bench_cell "$name" "${TARGET[$inst]}" "${PIDS[$inst]}" "$method" "$c" "$@"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
CELLS=(health warm nocache norl)
for c in $CONCURRENCY; do
  stage_begin "concurrency $c ($ROUNDS rounds)"
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < 4; k++)); do
      cell=${CELLS[$(((k + r - 1) % 4))]} # round r starts with the r-th cell
      case $cell in
        health) run_cell "health-c$c-r$r" warm health "$c" ;;
        *) run_cell "$cell-c$c-r$r" "$cell" get "$c" --order-ids-file "$RAW/order-ids.txt" ;;
      esac
    done
  done
  stage_end "done"
done

n=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan --pattern "bench-nocache:o:*" | wc -l)
if [ "$n" != 0 ]; then
  FAILED=1
  log "bench: nocache put $n orders in Redis although ORDERD_CACHE_ENABLED=false"
fi
# Fallbacks or Redis errors during the run would make "warm" something else: say so.
grep -h '"level":"\(warn\|error\)"' "$RAW"/orderd-*.log >"$RAW/warnings.txt" 2>/dev/null || true
for n in "${!PIDS[@]}"; do stop_pid "${PIDS[$n]}" "orderd $n"; done
PIDS=()

# ---- 5. report ---------------------------------------------------------------------------------
cat >"$RAW/meta.json" <<EOF
{"concurrency": "$CONCURRENCY", "rounds": $ROUNDS, "duration": "$DURATION", "warmup": "$WARMUP",
 "connections": "$CONNECTIONS", "threads": $THREADS, "workers": "${WORKERS:-8 (config.yaml)}",
 "orders": $ORDERS, "limits": "$HIGH", "clk_tck": $(getconf CLK_TCK), "cores": $(nproc),
 "cpu": "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)",
 "commit": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')",
 "dirty": "$(if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then echo yes; else echo no; fi)",
 "redis": "$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')",
 "postgres": "$("$PSQL" "${PGARGS[@]}" -d postgres -XtAc 'SHOW server_version' 2>/dev/null || echo '?')",
 "load_before": "$LOAD_BEFORE", "load_after": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "date": "$(date -u '+%Y-%m-%d %H:%M UTC')", "raw": "${RAW#"$ROOT"/}"}
EOF
"$PY" "$ROOT/bench/cache_report.py" "$RAW" | tee "$REPORT"
log "bench: report written to ${REPORT#"$ROOT"/}"
if [ "$FAILED" != 0 ]; then
  log "bench: some calls failed; see above and $RAW/"
  exit 1
fi
