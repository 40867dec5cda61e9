#!/usr/bin/env bash
# The orderd benchmark: builds a release tree, starts PostgreSQL (the private stack) and a
# private orderd on a fresh database, then measures, at each concurrency:
#   health      /grpc.health.v1.Health/Check: the bare round trip of the gRPC stack
#   GetOrder    through orderd, then pgbench running GetOrder's SQL (pgbench/get_order.sql)
#   PlaceOrder  through orderd, then pgbench running PlaceOrder's SQL (pgbench/place_order.sql)
# with the CPU each process used, and prints a table with the ratios orderd / pgbench. The
# report goes to stdout and to .local/bench/report-<timestamp>.md; the raw outputs to
# .local/bench/raw-<timestamp>/. Everything it started is stopped at the end.
# See bench/README.md for how to read the numbers. Knobs (environment):
#   BENCH_CONCURRENCY="1 8 32 64"  BENCH_DURATION=10s  BENCH_WARMUP=2s
#   BENCH_CONNECTIONS=auto (min(concurrency, 8))  BENCH_THREADS=1 (client threads)
#   BENCH_PORT=50061  BENCH_DB=orderd_bench  BENCH_WORKERS=(config.yaml's)  BENCH_ORDERS=500
#   BENCH_PGBENCH_JOBS=2  BENCH_LOGCOST=1 (one extra GetOrder run with info-level logs)
#   BENCH_BUILD=1 (0: use build-bench/ as it is)  BENCH_KEEP_DB=0 (1: keep the database)
#   BENCH_STACK=1 (0: use a PostgreSQL already running on 127.0.0.1:BENCH_PG_PORT as
#   BENCH_PG_USER, trust auth; the stack is then neither started nor stopped)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

CONCURRENCY=${BENCH_CONCURRENCY:-"1 8 32 64"}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
PORT=${BENCH_PORT:-50061}
DB=${BENCH_DB:-orderd_bench}
PGBENCH_JOBS=${BENCH_PGBENCH_JOBS:-2}
LOGCOST=${BENCH_LOGCOST:-1}
KEEP_DB=${BENCH_KEEP_DB:-0}
BUILD=$ROOT/build-bench
TARGET=127.0.0.1:$PORT
pg_settings

RAW=$OUT/raw-$STAMP # one file per measurement: JSON lines, pgbench output, CPU counters
REPORT=$OUT/report-$STAMP.md
mkdir -p "$RAW"

# "10s" / "500ms" / "2m" -> whole seconds for pgbench -T (at least 1)
DURATION_S=$("$PY" -c '
import re, sys
m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", sys.argv[1])
if not m:
    sys.exit("bad BENCH_DURATION: " + sys.argv[1])
print(max(1, round(float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)])))
' "$DURATION")

# ---- clean-up: stop only what this script started -------------------------------------
ORDERD_PID=""
STARTED_PG=0
DB_CREATED=0
PSQL=psql
PGBENCH=pgbench

# stop_orderd: SIGTERM (orderd drains and exits 0), SIGKILL after 15 s.
stop_orderd() {
  [ -n "$ORDERD_PID" ] || return 0
  stop_pid "$ORDERD_PID" orderd
  ORDERD_PID=""
}

cleanup() {
  local rc=$?
  stop_orderd
  cleanup_pg
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- CPU accounting (proc_ticks, machine_busy, pg_ticks: bench/lib.sh) -------------------
pg_children() { if [ -n "$PG_PM" ]; then pgrep -c -P "$PG_PM" || true; else echo 0; fi; }
# pg_settle N: waits (at most 5 s) until the postmaster has at most N children again, so
# that the backends of a finished pgbench are reaped (and their CPU in the postmaster's
# count) before the next reading, never half-way through it.
pg_settle() {
  local i
  for ((i = 0; i < 50; i++)); do
    [ "$(pg_children)" -gt "$1" ] || return 0
    sleep 0.1
  done
}
# cpu_snapshot FILE PREFIX: appends PREFIX_{orderd,pg,machine,time} lines to FILE (orderd:
# ORDERD_PID; bench_cell's third argument, the same pid, is not used).
cpu_snapshot() {
  {
    echo "$2_orderd=$([ -n "$ORDERD_PID" ] && proc_ticks "$ORDERD_PID" || echo 0)"
    echo "$2_pg=$(pg_ticks)"
    echo "$2_machine=$(machine_busy)"
    echo "$2_time=$(date +%s.%N)"
  } >>"$1"
}

# ---- 1. build ----------------------------------------------------------------------------
stage_begin "build (release, $BUILD)"
build_release
stage_end ok

# ---- 2. PostgreSQL and the database ------------------------------------------------------
start_pg

stage_begin "fresh database $DB"
fresh_db
export ORDERD_SERVER_LISTEN="$TARGET"
# Rate limits stay on (the limiter's Redis call is part of every request's cost) but set
# so high that they never refuse: the shipped config.yaml allows a customer 5 PlaceOrders
# a second, and this measures throughput, not the limiter. This script starts no Redis
# (bench/cache.sh measures the cache), so orderd reads PostgreSQL and limits locally.
export ORDERD_RATELIMIT_CUSTOMER=1000000/1000000 ORDERD_RATELIMIT_SERVICE=1000000/1000000
export ORDERD_RATELIMIT_ADMIN=1000000/1000000 ORDERD_RATELIMIT_OVERRIDES=""
migrate_db
stage_end ok

# ---- 3. orderd ------------------------------------------------------------------------------
# start_orderd LEVEL: orderd serve in the background; returns once Health says SERVING.
start_orderd() {
  local logf=$RAW/orderd-$1.log
  ORDERD_LOG_LEVEL=$1 "$ORDERD" serve --config "$ROOT/config.yaml" >"$logf" 2>&1 &
  ORDERD_PID=$!
  wait_serving "$ORDERD_PID" "$TARGET" "$logf" orderd || { ORDERD_PID=""; die "orderd exited at start (log: $logf)"; }
}

stage_begin "orderd serve on $TARGET (log level warn)"
start_orderd warn
tokens_and_products 1h "$TARGET"
stage_end "pid $ORDERD_PID"

stage_begin "orders to read: $ORDERS through PlaceOrder, $ORDERS pgbench fixtures"
# orderd's GetOrder runs read orders placed through the API, once, here (not measured).
place_orders "$TARGET" "the orders GetOrder reads"
# get_order.sql reads orders whose ids it can compute: md5('bench-<n>'), n in 1..BENCH_ORDERS.
"$PSQL" "${PGARGS[@]}" -d "$DB" -qX -v ON_ERROR_STOP=1 -v norders="$ORDERS" \
  -f "$ROOT/bench/pgbench/fixtures.sql" >"$RAW/fixtures.log" 2>&1 ||
  { cat "$RAW/fixtures.log" >&2; die "loading bench/pgbench/fixtures.sql failed"; }
stage_end ok

# ---- 4. measurements -------------------------------------------------------------------------
FAILED=0

# orderd_run NAME METHOD C [extra args]: one orderd-bench run -> NAME.json, NAME.txt, NAME.cpu
orderd_run() {
  local name=$1 method=$2 c=$3
  shift 3
  log "bench: $name: orderd $method, concurrency $c, $(conns_for "$c") connections, $DURATION"
  bench_cell "$name" "$TARGET" "$ORDERD_PID" "$method" "$c" --products "$PRODUCTS" "$@"
}

# pgbench_run NAME SCRIPT C: pgbench -M prepared -> NAME.pgbench, NAME.cpu
pgbench_run() {
  local name=$1 script=$2 c=$3 j=$PGBENCH_JOBS t0 t1 nchildren
  [ "$j" -le "$c" ] || j=$c
  nchildren=$(pg_children)
  log "bench: $name: pgbench $(basename "$script"), -c $c -j $j -T $DURATION_S"
  : >"$RAW/$name.cpu"
  cpu_snapshot "$RAW/$name.cpu" before
  t0=$(awk '{ print $14 + $15 + $16 + $17 }' /proc/$$/stat) # this shell's reaped children
  if ! "$PGBENCH" "${PGARGS[@]}" -n -M prepared -c "$c" -j "$j" -T "$DURATION_S" \
    -D norders="$ORDERS" -f "$script" "$DB" >"$RAW/$name.pgbench" 2>&1; then
    FAILED=1
    log "bench: $name: pgbench failed:"
    tail -n 20 "$RAW/$name.pgbench" >&2
    return 0
  fi
  t1=$(awk '{ print $14 + $15 + $16 + $17 }' /proc/$$/stat)
  pg_settle "$nchildren"
  cpu_snapshot "$RAW/$name.cpu" after
  echo "client_ticks=$((t1 - t0))" >>"$RAW/$name.cpu"
  if ! grep -q '^number of failed transactions: 0 ' "$RAW/$name.pgbench"; then
    FAILED=1
    log "bench: $name: pgbench reports failed transactions"
  fi
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for c in $CONCURRENCY; do
  stage_begin "concurrency $c"
  # The previous level's writes, vacuumed now rather than by autovacuum during a measurement.
  "$PSQL" "${PGARGS[@]}" -d "$DB" -qXc "VACUUM ANALYZE" >/dev/null
  orderd_run "health-c$c" health "$c"
  orderd_run "get-c$c" get "$c" --order-ids-file "$RAW/order-ids.txt"
  pgbench_run "pg-get-c$c" "$ROOT/bench/pgbench/get_order.sql" "$c"
  orderd_run "place-c$c" place "$c"
  pgbench_run "pg-place-c$c" "$ROOT/bench/pgbench/place_order.sql" "$c"
  stage_end "done"
done

LOGCOST_C=""
if [ "$LOGCOST" = 1 ]; then
  # The GetOrder run of the highest concurrency again, with info-level access logs (one
  # JSON line per call, to a file).
  for c in $CONCURRENCY; do LOGCOST_C=$c; done
  stage_begin "logging cost: GetOrder at concurrency $LOGCOST_C, log level info"
  stop_orderd
  start_orderd info
  orderd_run "get-c$LOGCOST_C-info" get "$LOGCOST_C" --order-ids-file "$RAW/order-ids.txt"
  stage_end "done ($(wc -l <"$RAW/orderd-info.log") log lines)"
fi
stop_orderd

# ---- 5. report ---------------------------------------------------------------------------------
cat >"$RAW/meta.json" <<EOF
{"concurrency": "$CONCURRENCY", "duration": "$DURATION", "warmup": "$WARMUP",
 "duration_s": $DURATION_S, "connections": "$CONNECTIONS", "threads": $THREADS,
 "pgbench_jobs": $PGBENCH_JOBS, "workers": "${WORKERS:-8 (config.yaml)}", "orders": $ORDERS,
 "logcost_c": "$LOGCOST_C", "use_stack": $USE_STACK, "pg": "$PG_HOST:$PG_PORT", "db": "$DB",
 "clk_tck": $(getconf CLK_TCK), "cores": $(nproc),
 "cpu": "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)",
 "mem_gib": $(free -g | awk '/^Mem:/{ print $2 }'),
 "commit": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')",
 "dirty": "$(if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then echo yes; else echo no; fi)",
 "grpc": "$(dpkg-query -W -f='${Version}' libgrpc-dev 2>/dev/null || echo '?')",
 "postgres": "$("$PSQL" "${PGARGS[@]}" -d postgres -XtAc 'SHOW server_version' 2>/dev/null || echo '?')",
 "fsync": "$("$PSQL" "${PGARGS[@]}" -d postgres -XtAc 'SHOW fsync' 2>/dev/null || echo '?')",
 "load_before": "$LOAD_BEFORE", "load_after": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "date": "$(date -u '+%Y-%m-%d %H:%M UTC')", "raw": "${RAW#"$ROOT"/}"}
EOF
"$PY" "$ROOT/bench/report.py" "$RAW" | tee "$REPORT"
log "bench: report written to ${REPORT#"$ROOT"/}"

if [ "$FAILED" != 0 ]; then
  log "bench: some calls or transactions failed; see above and $RAW/"
  exit 1
fi
