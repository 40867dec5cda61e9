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

CONCURRENCY=${BENCH_CONCURRENCY:-"1 8 32 64"}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
CONNECTIONS=${BENCH_CONNECTIONS:-auto}
THREADS=${BENCH_THREADS:-1}
PORT=${BENCH_PORT:-50061}
DB=${BENCH_DB:-orderd_bench}
WORKERS=${BENCH_WORKERS:-}
ORDERS=${BENCH_ORDERS:-500}
PGBENCH_JOBS=${BENCH_PGBENCH_JOBS:-2}
LOGCOST=${BENCH_LOGCOST:-1}
DO_BUILD=${BENCH_BUILD:-1}
KEEP_DB=${BENCH_KEEP_DB:-0}
USE_STACK=${BENCH_STACK:-1}
PG_HOST=127.0.0.1
PG_PORT=${BENCH_PG_PORT:-${STACK_PG_PORT:-55432}}
PG_USER=${BENCH_PG_USER:-orderd}
BUILD=$ROOT/build-bench
PRODUCTS=sku-a,sku-b # bench/pgbench/*.sql name them too
TARGET=127.0.0.1:$PORT
DSN="host=$PG_HOST port=$PG_PORT dbname=$DB user=$PG_USER connect_timeout=3"
PGARGS=(-h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")
case "$DB" in *[!a-z0-9_]* | "") die "BENCH_DB must be a plain lower-case name" ;; esac

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$ROOT/.local/bench
RAW=$OUT/raw-$STAMP # one file per measurement: JSON lines, pgbench output, CPU counters
REPORT=$OUT/report-$STAMP.md
mkdir -p "$RAW"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

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
  local i rc=0
  kill -TERM "$ORDERD_PID" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    kill -0 "$ORDERD_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$ORDERD_PID" 2>/dev/null; then
    log "bench: orderd (pid $ORDERD_PID) still running 15 s after SIGTERM; killing it"
    kill -KILL "$ORDERD_PID" 2>/dev/null || true
  fi
  wait "$ORDERD_PID" 2>/dev/null || rc=$?
  [ "$rc" = 0 ] || log "bench: orderd exited with status $rc after SIGTERM (expected 0)"
  ORDERD_PID=""
}

cleanup() {
  local rc=$?
  stop_orderd
  if [ "$DB_CREATED" = 1 ] && [ "$KEEP_DB" != 1 ]; then
    "$PSQL" "${PGARGS[@]}" -d postgres -qXc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  fi
  if [ "$STARTED_PG" = 1 ]; then
    "$ROOT/scripts/stack.sh" stop pg >&2 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- CPU accounting (clock ticks, from /proc) ---------------------------------------------
# proc_ticks PID: user+system of PID plus its reaped children (0 if gone).
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# machine_busy: busy ticks of all CPUs: user nice system steal. Interrupt time is left out:
# much of it is the benchmark's own loopback traffic, charged to no process.
machine_busy() { awk '/^cpu /{ print $2 + $3 + $4 + $9 }' /proc/stat; }
PG_PM=""
# pg_ticks: the PostgreSQL server: postmaster (with the backends it reaped) + live children.
pg_ticks() {
  local t=0 p
  [ -n "$PG_PM" ] || { echo 0; return; }
  t=$(proc_ticks "$PG_PM")
  for p in $(pgrep -P "$PG_PM" || true); do t=$((t + $(proc_ticks "$p"))); done
  echo "$t"
}
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
# cpu_snapshot FILE PREFIX: appends PREFIX_{orderd,pg,machine,time} lines to FILE.
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
if [ "$DO_BUILD" = 1 ]; then
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DORDERD_TESTS=OFF >"$RAW/build.log" 2>&1 ||
    { tail -n 30 "$RAW/build.log" >&2; die "cmake configure failed (log: $RAW/build.log)"; }
  cmake --build "$BUILD" -j2 --target orderd orderd-bench >>"$RAW/build.log" 2>&1 ||
    { tail -n 40 "$RAW/build.log" >&2; die "build failed (log: $RAW/build.log)"; }
fi
ORDERD=$BUILD/orderd
BENCH=$BUILD/bench/orderd-bench
if [ ! -x "$ORDERD" ] || [ ! -x "$BENCH" ]; then die "$ORDERD or $BENCH missing (BENCH_BUILD=0 needs a built tree)"; fi
stage_end ok

# ---- 2. PostgreSQL and the database ------------------------------------------------------
if [ "$USE_STACK" = 1 ]; then
  stage_begin "PostgreSQL (private stack, 127.0.0.1:$PG_PORT)"
  if "$ROOT/scripts/stack.sh" status pg >/dev/null 2>&1; then
    stage_end "already running; left running"
  else
    STARTED_PG=1 # set first: a start that fails half-way is still stopped
    "$ROOT/scripts/stack.sh" start pg >&2
    stage_end "started; stopped again at the end"
  fi
else
  stage_begin "PostgreSQL (BENCH_STACK=0: the one already running on $PG_HOST:$PG_PORT)"
  stage_end "neither started nor stopped by this script"
fi
if PGBIN=$(pg_bindir 2>/dev/null); then
  PSQL=$PGBIN/psql
  PGBENCH=$PGBIN/pgbench
fi
# The postmaster: the process listening on the port (for the CPU figures only).
PG_PM=$(ss -Hltnp "sport = :$PG_PORT" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n 1)
[ -n "$PG_PM" ] || log "bench: cannot find the PostgreSQL server process; its CPU is not reported"

stage_begin "fresh database $DB"
"$PSQL" "${PGARGS[@]}" -d postgres -qXc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
"$PSQL" "${PGARGS[@]}" -d postgres -qXc "CREATE DATABASE $DB OWNER $PG_USER" >/dev/null
DB_CREATED=1
# Secrets for this run only: the developer's .local/secrets are neither used nor touched.
export ORDERD_POSTGRES_DSN="$DSN"
ORDERD_AUTH_HS256_SECRET=$(head -c 48 /dev/urandom | base64 -w0)
ORDERD_ORDERS_PAGE_TOKEN_SECRET=$(head -c 48 /dev/urandom | base64 -w0)
export ORDERD_AUTH_HS256_SECRET ORDERD_ORDERS_PAGE_TOKEN_SECRET
export ORDERD_SERVER_LISTEN="$TARGET"
if [ -n "$WORKERS" ]; then export ORDERD_SERVER_WORKERS="$WORKERS"; fi
"$ORDERD" migrate --config "$ROOT/config.yaml" >"$RAW/migrate.log" 2>&1 ||
  { cat "$RAW/migrate.log" >&2; die "orderd migrate failed"; }
stage_end ok

# ---- 3. orderd ------------------------------------------------------------------------------
# start_orderd LEVEL: orderd serve in the background; returns once Health says SERVING.
start_orderd() {
  local level=$1 logf=$RAW/orderd-$1.log i
  ORDERD_LOG_LEVEL=$level "$ORDERD" serve --config "$ROOT/config.yaml" >"$logf" 2>&1 &
  ORDERD_PID=$!
  for ((i = 0; i < 60; i++)); do
    if ! kill -0 "$ORDERD_PID" 2>/dev/null; then
      tail -n 30 "$logf" >&2
      ORDERD_PID=""
      die "orderd exited at start (log: $logf)"
    fi
    if "$BENCH" --target "$TARGET" --method health --requests 1 --warmup 0 --connections 1 \
      --concurrency 1 --connect-timeout 1s --quiet >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  tail -n 30 "$logf" >&2
  die "orderd did not become SERVING on $TARGET within 30 s (log: $logf)"
}

stage_begin "orderd serve on $TARGET (log level warn)"
start_orderd warn
(umask 077 &&
  "$ORDERD" token --subject bench-admin --role admin --ttl 1h --config "$ROOT/config.yaml" >"$RAW/admin.token" &&
  "$ORDERD" token --subject bench-customer --role customer --ttl 1h --config "$ROOT/config.yaml" >"$RAW/customer.token") ||
  die "orderd token failed"
"$BENCH" --target "$TARGET" --method seed --token-file "$RAW/admin.token" --products "$PRODUCTS" \
  --connections 1 --concurrency 1 >&2 || die "seeding the products through UpsertProduct failed"
stage_end "pid $ORDERD_PID"

stage_begin "orders to read: $ORDERS through PlaceOrder, $ORDERS pgbench fixtures"
# orderd's GetOrder runs read orders placed through the API, once, here (not measured).
"$BENCH" --target "$TARGET" --method place --token-file "$RAW/customer.token" --products "$PRODUCTS" \
  --requests "$ORDERS" --warmup 0 --concurrency 8 --connections 8 --save-order-ids "$RAW/order-ids.txt" \
  >"$RAW/preload.txt" 2>&1 || { cat "$RAW/preload.txt" >&2; die "placing the orders GetOrder reads failed"; }
# get_order.sql reads orders whose ids it can compute: md5('bench-<n>'), n in 1..BENCH_ORDERS.
"$PSQL" "${PGARGS[@]}" -d "$DB" -qX -v ON_ERROR_STOP=1 -v norders="$ORDERS" \
  -f "$ROOT/bench/pgbench/fixtures.sql" >"$RAW/fixtures.log" 2>&1 ||
  { cat "$RAW/fixtures.log" >&2; die "loading bench/pgbench/fixtures.sql failed"; }
stage_end ok

# ---- 4. measurements -------------------------------------------------------------------------
FAILED=0
conns_for() { if [ "$CONNECTIONS" = auto ]; then echo $(($1 < 8 ? $1 : 8)); else echo "$CONNECTIONS"; fi; }

# orderd_run NAME METHOD C [extra args]: one orderd-bench run -> NAME.json, NAME.txt, NAME.cpu
orderd_run() {
  local name=$1 method=$2 c=$3
  shift 3
  local token=()
  [ "$method" = health ] || token=(--token-file "$RAW/customer.token")
  log "bench: $name: orderd $method, concurrency $c, $(conns_for "$c") connections, $DURATION"
  : >"$RAW/$name.cpu"
  cpu_snapshot "$RAW/$name.cpu" before
  if ! "$BENCH" --target "$TARGET" --method "$method" "${token[@]}" --concurrency "$c" \
    --connections "$(conns_for "$c")" --threads "$THREADS" --duration "$DURATION" \
    --warmup "$WARMUP" --products "$PRODUCTS" --json --allow-errors --quiet "$@" \
    >"$RAW/$name.json" 2>"$RAW/$name.txt"; then
    FAILED=1
    log "bench: $name: orderd-bench failed:"
    cat "$RAW/$name.txt" >&2
    return 0
  fi
  cpu_snapshot "$RAW/$name.cpu" after
  if ! grep -q '"errors_total":0,' "$RAW/$name.json"; then
    FAILED=1
    log "bench: $name: some calls failed:"
    cat "$RAW/$name.txt" >&2
  fi
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
