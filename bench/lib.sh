# shellcheck shell=bash
# Helpers shared by bench/run.sh and bench/cache.sh; sourced after scripts/lib.sh (log, die,
# stage_begin/stage_end, pg_bindir), with ROOT set. Sets the knobs both scripts take
# (CONNECTIONS THREADS WORKERS ORDERS DO_BUILD USE_STACK PG_*, PRODUCTS) and STAMP OUT PY;
# the functions also use the caller's RAW BUILD DB DURATION WARMUP KEEP_DB (unset: 0),
#   PSQL STARTED_PG DB_CREATED FAILED, and a cpu_snapshot FILE PREFIX PID of its own
# and set ORDERD, BENCH (build_release), PSQL, PGBENCH, PG_PM (start_pg).

# ---- the knobs both take (bench/README.md), and where the outputs go ------------------------
CONNECTIONS=${BENCH_CONNECTIONS:-auto}
THREADS=${BENCH_THREADS:-1}
WORKERS=${BENCH_WORKERS:-}
ORDERS=${BENCH_ORDERS:-500}
DO_BUILD=${BENCH_BUILD:-1}
USE_STACK=${BENCH_STACK:-1}
PG_HOST=127.0.0.1
PG_PORT=${BENCH_PG_PORT:-${STACK_PG_PORT:-55432}}
PG_USER=${BENCH_PG_USER:-orderd}
PRODUCTS=sku-a,sku-b # bench/pgbench/*.sql name them too
# shellcheck disable=SC2034 # STAMP, OUT: the callers'
STAMP=$(date +%Y%m%d-%H%M%S)
# shellcheck disable=SC2034
OUT=$ROOT/.local/bench
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

# pg_settings: DSN and PGARGS for DB on PG_HOST:PG_PORT as PG_USER; dies if BENCH_DB is not
# a plain name.
pg_settings() {
  DSN="host=$PG_HOST port=$PG_PORT dbname=$DB user=$PG_USER connect_timeout=3"
  PGARGS=(-h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")
  case "$DB" in *[!a-z0-9_]* | "") die "BENCH_DB must be a plain lower-case name" ;; esac
}

# ---- clean-up ----------------------------------------------------------------------------
# stop_pid PID WHAT: SIGTERM, SIGKILL after 15 s; logs a non-zero exit.
stop_pid() {
  local pid=$1 what=$2 i rc=0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "bench: $what (pid $pid) still running 15 s after SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || rc=$?
  [ "$rc" = 0 ] || log "bench: $what exited with status $rc after SIGTERM (expected 0)"
}

# cleanup_pg: drops the database this script created (unless KEEP_DB=1) and stops the
# stack's PostgreSQL if this script started it.
cleanup_pg() {
  if [ "$DB_CREATED" = 1 ] && [ "${KEEP_DB:-0}" != 1 ]; then
    "$PSQL" "${PGARGS[@]}" -d postgres -qXc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  fi
  if [ "$STARTED_PG" = 1 ]; then "$ROOT/scripts/stack.sh" stop pg >&2 || true; fi
}

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

# ---- stages --------------------------------------------------------------------------------
# build_release: the release tree in BUILD (unless DO_BUILD=0); sets ORDERD and BENCH.
build_release() {
  if [ "$DO_BUILD" = 1 ]; then
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DORDERD_TESTS=OFF >"$RAW/build.log" 2>&1 ||
      { tail -n 30 "$RAW/build.log" >&2; die "cmake configure failed (log: $RAW/build.log)"; }
    cmake --build "$BUILD" -j2 --target orderd orderd-bench >>"$RAW/build.log" 2>&1 ||
      { tail -n 40 "$RAW/build.log" >&2; die "build failed (log: $RAW/build.log)"; }
  fi
  ORDERD=$BUILD/orderd
  BENCH=$BUILD/bench/orderd-bench
  if [ ! -x "$ORDERD" ] || [ ! -x "$BENCH" ]; then die "$ORDERD or $BENCH missing (BENCH_BUILD=0 needs a built tree)"; fi
}

# start_pg: the PostgreSQL stage: the private stack (started unless it runs already; then
# stopped at the end) or, with BENCH_STACK=0, the server already on PG_HOST:PG_PORT. Sets
# PSQL and PGBENCH (the server version's) and PG_PM, the postmaster: the process listening
# on the port (for the CPU figures only).
start_pg() {
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
    # shellcheck disable=SC2034 # used by run.sh only
    PGBENCH=$PGBIN/pgbench
  fi
  PG_PM=$(ss -Hltnp "sport = :$PG_PORT" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n 1)
  [ -n "$PG_PM" ] || log "bench: cannot find the PostgreSQL server process; its CPU is not reported"
}

# fresh_db: DB dropped and created again (DB_CREATED=1); exports its DSN and secrets made up
# for this run only (the developer's .local/secrets are neither used nor touched).
fresh_db() {
  "$PSQL" "${PGARGS[@]}" -d postgres -qXc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
  "$PSQL" "${PGARGS[@]}" -d postgres -qXc "CREATE DATABASE $DB OWNER $PG_USER" >/dev/null
  DB_CREATED=1
  export ORDERD_POSTGRES_DSN="$DSN"
  ORDERD_AUTH_HS256_SECRET=$(head -c 48 /dev/urandom | base64 -w0)
  ORDERD_ORDERS_PAGE_TOKEN_SECRET=$(head -c 48 /dev/urandom | base64 -w0)
  export ORDERD_AUTH_HS256_SECRET ORDERD_ORDERS_PAGE_TOKEN_SECRET
}

# migrate_db: BENCH_WORKERS (if set) exported for every orderd, then orderd migrate.
migrate_db() {
  if [ -n "$WORKERS" ]; then export ORDERD_SERVER_WORKERS="$WORKERS"; fi
  "$ORDERD" migrate --config "$ROOT/config.yaml" >"$RAW/migrate.log" 2>&1 ||
    { cat "$RAW/migrate.log" >&2; die "orderd migrate failed"; }
}

# ---- orderd --------------------------------------------------------------------------------
# wait_serving PID TARGET LOG WHAT: returns once Health on TARGET says SERVING; returns 1
# (the tail of LOG shown) if PID exits first; dies if it is not SERVING within 30 s.
wait_serving() {
  local pid=$1 target=$2 logf=$3 what=$4 i
  for ((i = 0; i < 60; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$logf" >&2
      return 1
    fi
    if "$BENCH" --target "$target" --method health --requests 1 --warmup 0 --connections 1 \
      --concurrency 1 --connect-timeout 1s --quiet >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  tail -n 30 "$logf" >&2
  die "$what did not become SERVING on $target within 30 s (log: $logf)"
}

# tokens_and_products TTL TARGET: admin.token and customer.token (mode 600, valid for TTL) in
# RAW; the PRODUCTS upserted through TARGET's UpsertProduct.
tokens_and_products() {
  (umask 077 &&
    "$ORDERD" token --subject bench-admin --role admin --ttl "$1" --config "$ROOT/config.yaml" >"$RAW/admin.token" &&
    "$ORDERD" token --subject bench-customer --role customer --ttl "$1" --config "$ROOT/config.yaml" >"$RAW/customer.token") ||
    die "orderd token failed"
  "$BENCH" --target "$2" --method seed --token-file "$RAW/admin.token" --products "$PRODUCTS" \
    --connections 1 --concurrency 1 >&2 || die "seeding the products through UpsertProduct failed"
}

# place_orders TARGET WHAT: ORDERS orders placed through TARGET (not measured), their ids in
# RAW/order-ids.txt; dies with "placing WHAT failed".
# shellcheck disable=SC2153 # ORDERS: set above
place_orders() {
  "$BENCH" --target "$1" --method place --token-file "$RAW/customer.token" --products "$PRODUCTS" \
    --requests "$ORDERS" --warmup 0 --concurrency 8 --connections 8 --save-order-ids "$RAW/order-ids.txt" \
    >"$RAW/preload.txt" 2>&1 || { cat "$RAW/preload.txt" >&2; die "placing $2 failed"; }
}

# ---- measurements --------------------------------------------------------------------------
conns_for() { if [ "$CONNECTIONS" = auto ]; then echo $(($1 < 8 ? $1 : 8)); else echo "$CONNECTIONS"; fi; }

# bench_cell NAME TARGET PID METHOD C [extra args]: one orderd-bench run on TARGET ->
# NAME.json, NAME.txt, NAME.cpu (cpu_snapshot FILE before|after PID around it); FAILED=1 if
# orderd-bench failed or any call did.
# shellcheck disable=SC2034 # FAILED: the caller's
bench_cell() {
  local name=$1 target=$2 pid=$3 method=$4 c=$5
  shift 5
  local token=()
  [ "$method" = health ] || token=(--token-file "$RAW/customer.token")
  : >"$RAW/$name.cpu"
  cpu_snapshot "$RAW/$name.cpu" before "$pid"
  if ! "$BENCH" --target "$target" --method "$method" "${token[@]}" --concurrency "$c" \
    --connections "$(conns_for "$c")" --threads "$THREADS" --duration "$DURATION" \
    --warmup "$WARMUP" --json --allow-errors --quiet "$@" >"$RAW/$name.json" 2>"$RAW/$name.txt"; then
    FAILED=1
    log "bench: $name: orderd-bench failed:"
    cat "$RAW/$name.txt" >&2
    return 0
  fi
  cpu_snapshot "$RAW/$name.cpu" after "$pid"
  if ! grep -q '"errors_total":0,' "$RAW/$name.json"; then
    FAILED=1
    log "bench: $name: some calls failed:"
    cat "$RAW/$name.txt" >&2
  fi
}
