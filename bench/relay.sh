#!/usr/bin/env bash
# The outbox relay benchmark (issue 5): events per second through the relay, and the lag
# from commit to broker ack, in one run. Builds the release tree (and amqp-baseline),
# uses PostgreSQL and RabbitMQ of the private stack (started if they are not running, and
# then stopped again), a fresh database and an exchange and queues of its own, and:
#   1. lag: at each concurrency, PlaceOrder (orderd-bench --method place) through an
#      orderd with the relay off (the reference; its events are retired unpublished), then
#      through one with the relay on (relay_batch from config.yaml, 100): per level the
#      calls/s, the events created and published per second, the lag published_at -
#      created_at of the events created in the window (p50/p90/p99/max, from the outbox),
#      the backlog at the window's end and its maximum, the CPU of orderd, PostgreSQL (the
#      benchmark database's backends) and the broker, and what the relay costs PlaceOrder;
#   2. drain: for each relay_batch, BENCH_RELAY_ORDERS orders placed through the relay-off
#      orderd, so the outbox holds a backlog of twice as many events; then an orderd with the
#      relay on and no RPC load, timed until every row is published: the relay's events/s,
#      its rounds, its CPU per event, and one claim under EXPLAIN ANALYZE. The outbox is
#      analyzed with the backlog in it; for BENCH_RELAY_STALE_BATCHES again with statistics
#      taken before the backlog (what the planner knows after an outage in production);
#   3. baseline: right after each drain, bench/amqp_baseline.c publishes as many messages,
#      with the bodies of the outbox's events, the relay's properties, persistent and
#      mandatory to the same exchange, batch by batch with publisher confirms, no
#      PostgreSQL; the report divides the relay's rate by it.
# Report: stdout and .local/bench/relay-<stamp>.md (bench/relay_report.py); raw outputs in
# .local/bench/relay-raw-<stamp>/. Everything it started is stopped, its queues and
# exchanges deleted, its database dropped. See bench/README.md ("bench/relay.sh").
# Knobs (environment):
#   BENCH_CONCURRENCY="1 4 16"  BENCH_DURATION=10s  BENCH_WARMUP=2s  (the lag levels)
#   BENCH_RELAY_ORDERS=5000 (per drain: twice as many events)  BENCH_RELAY_BATCHES="20 100 500"
#   BENCH_RELAY_STALE_BATCHES=100 (drains with stale statistics; empty: none)
#   BENCH_DRAIN_TIMEOUT=120 (s; a drain that takes longer is reported as stuck)
#   BENCH_PORT=50081 (relay-on orderd; the relay-off one takes +1)  BENCH_HTTP_PORT=58181 (+1)
#   BENCH_DB=orderd_relaybench  BENCH_AMQP_PORT=55672  BENCH_AMQP_USER=guest
#   BENCH_AMQP_PASSWORD (guest)  BENCH_AMQP_PREFIX=bench (bench.events, bench.stock, ...)
#   BENCH_CONNECTIONS  BENCH_THREADS  BENCH_WORKERS  BENCH_BUILD  BENCH_BUILD_DIR  BENCH_STACK
#   BENCH_PG_PORT  BENCH_PG_USER  as for run.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

CONCURRENCY=${BENCH_CONCURRENCY:-"1 4 16"}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
RELAY_ORDERS=${BENCH_RELAY_ORDERS:-5000}
BATCHES=${BENCH_RELAY_BATCHES:-"20 100 500"}
STALE_BATCHES=${BENCH_RELAY_STALE_BATCHES-100}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-120}
PORT=${BENCH_PORT:-50081}
HTTP_PORT=${BENCH_HTTP_PORT:-58181}
DB=${BENCH_DB:-orderd_relaybench}
AMQP_HOST=127.0.0.1
AMQP_PORT=${BENCH_AMQP_PORT:-${STACK_AMQP_PORT:-55672}}
AMQP_USER=${BENCH_AMQP_USER:-guest}
PREFIX=${BENCH_AMQP_PREFIX:-bench}
KEEP_DB=0 # the database is always dropped at the end
BUILD=${BENCH_BUILD_DIR:-$ROOT/build-bench}
case "$BUILD" in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
pg_settings
for v in "$RELAY_ORDERS" "$DRAIN_TIMEOUT" $BATCHES $STALE_BATCHES; do
  case "$v" in *[!0-9]* | "" | 0) die "BENCH_RELAY_ORDERS, BENCH_DRAIN_TIMEOUT, BENCH_RELAY_BATCHES and BENCH_RELAY_STALE_BATCHES must be positive numbers" ;; esac
done
case "$PREFIX" in *[!a-z0-9_-]* | "") die "BENCH_AMQP_PREFIX must be a plain name" ;; esac
# seconds() 10s -> 10, 500ms -> 0.5 (orderd-bench's syntax)
seconds() { awk -v d="$1" 'BEGIN { n = d + 0; if (d ~ /ms$/) n /= 1000; else if (d ~ /m$/) n *= 60; print n }'; }
DURATION_S=$(seconds "$DURATION")
WARMUP_S=$(seconds "$WARMUP")

EXCHANGE=$PREFIX.events
STOCK_Q=$PREFIX.stock
ORDER_Q=$PREFIX.orders
REPLY_Q=$PREFIX.replies
DLX=$PREFIX.dlx
DLQ=$PREFIX.dlq
export AMQP_PASSWORD=${BENCH_AMQP_PASSWORD:-guest} # amqp-baseline's
export ORDERD_AMQP_PASSWORD=$AMQP_PASSWORD

RAW=$OUT/relay-raw-$STAMP
REPORT=$OUT/relay-$STAMP.md
mkdir -p "$RAW"

# ---- clean-up: stop only what this script started ------------------------------------
declare -A PIDS=() # instance name -> orderd pid
STARTED_PG=0
STARTED_RMQ=0
DB_CREATED=0
TOPOLOGY=0
PSQL=psql
BASELINE=""

stop_orderd() { # stop_orderd NAME
  [ -n "${PIDS[$1]:-}" ] || return 0
  stop_pid "${PIDS[$1]}" "orderd $1"
  unset "PIDS[$1]"
}
teardown_topology() {
  [ "$TOPOLOGY" = 1 ] && [ -n "$BASELINE" ] || return 0
  "$BASELINE" teardown --host "$AMQP_HOST" --port "$AMQP_PORT" --user "$AMQP_USER" \
    --queue "$STOCK_Q" --queue "$ORDER_Q" --queue "$REPLY_Q" --queue "$DLQ" \
    --delete-exchange "$EXCHANGE" --delete-exchange "$DLX" >>"$RAW/teardown.txt" 2>&1 ||
    log "bench: deleting the queues and exchanges failed (see $RAW/teardown.txt)"
  TOPOLOGY=0
}
cleanup() {
  local rc=$? n
  for n in "${!PIDS[@]}"; do stop_orderd "$n"; done
  teardown_topology
  if [ "$STARTED_RMQ" = 1 ]; then "$ROOT/scripts/stack.sh" stop rabbitmq >&2 || true; fi
  cleanup_pg
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- CPU accounting (proc_ticks, machine_busy, pg_ticks: bench/lib.sh) -------------------
RMQ_PID=""
# cpu_snapshot FILE PREFIX PID: orderd (PID; 0 if none), PostgreSQL, the broker, machine;
# and, in FILE with .pgdb for .cpu, "PREFIX pid ticks" of every PostgreSQL backend connected
# to DB. The stack's server is shared with other sessions (their test databases), so the
# report charges the benchmark with its own database's backends only (pg: the whole server).
cpu_snapshot() {
  local p
  {
    echo "$2_orderd=$(if [ -n "$3" ]; then proc_ticks "$3"; else echo 0; fi)"
    echo "$2_pg=$(pg_ticks)"
    echo "$2_rmq=$(if [ -n "$RMQ_PID" ]; then proc_ticks "$RMQ_PID"; else echo 0; fi)"
    echo "$2_machine=$(machine_busy)"
    echo "$2_time=$(date +%s.%N)"
  } >>"$1"
  [ -n "$PG_PM" ] || return 0
  for p in $(pgrep -P "$PG_PM" || true); do
    case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
      *" $DB "*) echo "$2 $p $(proc_ticks "$p")" ;;
    esac
  done >>"${1%.cpu}.pgdb"
}
# top_procs FILE: the processes that used CPU over one second (who else is on the machine).
top_procs() { top -b -n 2 -d 1 -w 200 2>/dev/null | awk '/^top -/ { n++ } n == 2' | sed -n '7,17p' >"$1" || true; }

# ---- SQL ------------------------------------------------------------------------------------
q() { "$PSQL" "${PGARGS[@]}" -d "$DB" -XtAq -v ON_ERROR_STOP=1 "$@"; }
unpublished() { q -c "SELECT count(*) FROM outbox WHERE published_at IS NULL"; }
max_seq() { q -c "SELECT coalesce(max(seq), 0) FROM outbox"; }
# retire_unsent: the unsent rows no relay must see (the relay-off cells' events) are marked
# sent without being published. Not deleted: the outbox keeps its history, as a production
# outbox keeps 7 days of sent rows. An emptied (or new) outbox is analyzed as an empty
# table, and the claim's plan for an empty table scans the whole table for every unsent
# row (bench/README.md, "bench/relay.sh"): that is not the steady state measured here.
retire_unsent() { q -c "UPDATE outbox SET published_at = clock_timestamp() WHERE published_at IS NULL" >/dev/null; }

# lag_sql WS WE: one JSON object about the events created in [WS, WE) (epoch seconds).
# The backlog is exact: +1 at each created_at, -1 at each published_at, summed in time
# order over the rows of the last minute (the previous level had drained by then).
lag_sql() {
  q -v ws="$1" -v we="$2" <<'SQL'
WITH w AS (
  SELECT extract(epoch FROM published_at - created_at) * 1000 AS lag_ms, published_at, attempts
  FROM outbox WHERE created_at >= to_timestamp(:ws) AND created_at < to_timestamp(:we)),
p AS (
  SELECT xmin::text AS x FROM outbox
  WHERE published_at >= to_timestamp(:ws) AND published_at < to_timestamp(:we)),
ev AS (
  SELECT created_at AS t, 1 AS d FROM outbox WHERE created_at > to_timestamp(:ws) - interval '1 minute'
  UNION ALL
  SELECT published_at, -1 FROM outbox
  WHERE created_at > to_timestamp(:ws) - interval '1 minute' AND published_at IS NOT NULL),
run AS (SELECT t, sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n FROM ev)
SELECT json_build_object(
  'created', (SELECT count(*) FROM w),
  'unpublished', (SELECT count(*) FROM w WHERE published_at IS NULL),
  'retried', (SELECT count(*) FROM w WHERE attempts > 1),
  'lag_ms', (SELECT json_build_object(
      'p50', percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_ms),
      'p90', percentile_cont(0.9) WITHIN GROUP (ORDER BY lag_ms),
      'p99', percentile_cont(0.99) WITHIN GROUP (ORDER BY lag_ms),
      'max', max(lag_ms), 'mean', avg(lag_ms))
    FROM w WHERE published_at IS NOT NULL),
  'published', (SELECT count(*) FROM p),
  'rounds', (SELECT count(DISTINCT x) FROM p),
  'backlog_end', (SELECT count(*) FROM outbox WHERE created_at < to_timestamp(:we)
    AND created_at > to_timestamp(:ws) - interval '1 minute'
    AND (published_at IS NULL OR published_at >= to_timestamp(:we))),
  'backlog_max', (SELECT coalesce(max(n), 0) FROM run
    WHERE t >= to_timestamp(:ws) AND t < to_timestamp(:we)),
  'drained_at', (SELECT extract(epoch FROM max(published_at)) FROM w))
SQL
}

# drain_sql S0 S1: one JSON object about the rows with seq in (S0, S1]; a "round" is one
# mark-sent transaction of the relay (the rows it marked share its xmin).
drain_sql() {
  q -v s0="$1" -v s1="$2" <<'SQL'
WITH r AS (
  SELECT published_at, attempts, xmin::text AS x, octet_length(payload::text) AS len
  FROM outbox WHERE seq > :s0 AND seq <= :s1),
rounds AS (
  SELECT x, count(*) AS n, max(published_at) AS t FROM r WHERE published_at IS NOT NULL GROUP BY x),
f AS (SELECT n, t FROM rounds ORDER BY t LIMIT 1)
SELECT json_build_object(
  'rows', (SELECT count(*) FROM r),
  'unpublished', (SELECT count(*) FROM r WHERE published_at IS NULL),
  'retried', (SELECT count(*) FROM r WHERE attempts > 1),
  'body_bytes_mean', (SELECT avg(len) FROM r),
  'rounds', (SELECT count(*) FROM rounds),
  'round_rows_max', (SELECT max(n) FROM rounds),
  'first_round_rows', (SELECT n FROM f),
  'first_mark', (SELECT extract(epoch FROM t) FROM f),
  'last_mark', (SELECT extract(epoch FROM max(t)) FROM rounds))
SQL
}

# ---- broker ---------------------------------------------------------------------------------
amqp_tool() { "$BASELINE" "$1" --host "$AMQP_HOST" --port "$AMQP_PORT" --user "$AMQP_USER" "${@:2}"; }
purge_queues() { amqp_tool purge --queue "$STOCK_Q" --queue "$ORDER_Q" >>"$RAW/purges.txt" || die "purging $STOCK_Q / $ORDER_Q failed"; }
# metrics NAME FILE: the outbox / amqp lines of instance NAME's /metrics
metrics() {
  curl -fsS --max-time 2 "http://${HTTP[$1]}/metrics" 2>/dev/null |
    grep -E '^orderd_(outbox|amqp)_' >"$2" || true
}

# ---- 1. build ----------------------------------------------------------------------------
stage_begin "build (release, $BUILD)"
build_release
if [ "$DO_BUILD" = 1 ]; then
  cmake --build "$BUILD" -j2 --target amqp-baseline >>"$RAW/build.log" 2>&1 ||
    { tail -n 40 "$RAW/build.log" >&2; die "building amqp-baseline failed (log: $RAW/build.log)"; }
fi
BASELINE=$BUILD/bench/amqp-baseline
[ -x "$BASELINE" ] || die "$BASELINE missing (BENCH_BUILD=0 needs a built tree)"
command -v curl >/dev/null || die "curl not found"
stage_end ok

# ---- 2. PostgreSQL, RabbitMQ, the database, the exchange and queues -----------------------
start_pg

stage_begin "RabbitMQ on $AMQP_HOST:$AMQP_PORT"
if [ "$USE_STACK" = 1 ] && ! "$ROOT/scripts/stack.sh" status rabbitmq >/dev/null 2>&1; then
  STARTED_RMQ=1
  "$ROOT/scripts/stack.sh" start rabbitmq >&2
  RMQ_NOTE="started (private stack); stopped again at the end"
else
  RMQ_NOTE="already running; left running"
fi
RMQ_PID=$(ss -Hltnp "sport = :$AMQP_PORT" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n 1)
[ -n "$RMQ_PID" ] || log "bench: cannot find the broker's process; its CPU is not reported"
# Leftovers of an interrupted run (same names) go first; then the consumers' side as orderd
# declares it: a durable topic exchange, a durable queue bound to stock.*, one to order.*.
TOPOLOGY=1
teardown_topology
TOPOLOGY=1
amqp_tool declare --exchange "$EXCHANGE" --bind "$STOCK_Q=stock.*" --bind "$ORDER_Q=order.*" >&2 ||
  die "declaring $EXCHANGE and its queues failed"
stage_end "$RMQ_NOTE; exchange $EXCHANGE, queues $STOCK_Q (stock.*) and $ORDER_Q (order.*)"

stage_begin "fresh database $DB"
fresh_db
export ORDERD_LOG_LEVEL=warn
# No Redis: the cache and the rate limits are off (the RPCs are only the load here, and the
# stack's Redis is left alone).
export ORDERD_CACHE_ENABLED=false ORDERD_RATELIMIT_ENABLED=false
export ORDERD_AMQP_HOST=$AMQP_HOST ORDERD_AMQP_PORT=$AMQP_PORT ORDERD_AMQP_USER=$AMQP_USER
export ORDERD_AMQP_EXCHANGE=$EXCHANGE ORDERD_AMQP_DECLARE_QUEUES=true ORDERD_AMQP_QUORUM_QUEUES=false
export ORDERD_AMQP_STOCK_QUEUE=$STOCK_Q ORDERD_AMQP_ORDER_QUEUE=$ORDER_Q
export ORDERD_AMQP_REPLY_QUEUE=$REPLY_Q ORDERD_AMQP_DEAD_LETTER_EXCHANGE=$DLX ORDERD_AMQP_DEAD_LETTER_QUEUE=$DLQ
# BENCH_AMQP_TLS_PORT: orderd talks to the broker over TLS on that port (the stack's amqps
# listener, verified with its CA); amqp-baseline stays on the plain port, so the baseline
# ratio then shows what TLS costs the relay.
AMQP_SHOWN=$AMQP_HOST:$AMQP_PORT
if [ -n "${BENCH_AMQP_TLS_PORT:-}" ]; then
  export ORDERD_AMQP_PORT=$BENCH_AMQP_TLS_PORT ORDERD_AMQP_TLS=true
  export ORDERD_AMQP_TLS_CA_FILE=${BENCH_AMQP_TLS_CA:-$ROOT/.local/stack/rabbitmq/tls/ca.crt}
  AMQP_SHOWN="$AMQP_HOST:$BENCH_AMQP_TLS_PORT over TLS for orderd, $AMQP_HOST:$AMQP_PORT for the baseline"
fi
migrate_db
stage_end ok

# ---- orderd instances ---------------------------------------------------------------------
declare -A TARGET=([relay]="127.0.0.1:$PORT" [fill]="127.0.0.1:$((PORT + 1))")
declare -A HTTP=([relay]="127.0.0.1:$HTTP_PORT" [fill]="127.0.0.1:$((HTTP_PORT + 1))")
for n in relay fill; do
  if "$BENCH" --target "${TARGET[$n]}" --method health --requests 1 --warmup 0 --connections 1 \
    --concurrency 1 --connect-timeout 1s --quiet >/dev/null 2>&1 ||
    [ -n "$(ss -Hltn "sport = :${HTTP[$n]##*:}" 2>/dev/null)" ]; then
    die "${TARGET[$n]} or ${HTTP[$n]} is in use; set BENCH_PORT / BENCH_HTTP_PORT"
  fi
done
# start_orderd NAME LOGNAME WAIT VAR=VALUE...: orderd serve with those settings (WAIT=1:
# returns once SERVING).
start_orderd() {
  local name=$1 logf=$RAW/orderd-$2.log wait=$3
  shift 3
  env ORDERD_SERVER_LISTEN="${TARGET[$name]}" ORDERD_HTTP_LISTEN="${HTTP[$name]}" "$@" \
    "$ORDERD" serve --config "$ROOT/config.yaml" >"$logf" 2>&1 &
  PIDS[$name]=$!
  [ "$wait" = 1 ] || return 0
  wait_serving "${PIDS[$name]}" "${TARGET[$name]}" "$logf" "orderd $name" ||
    { unset "PIDS[$name]"; die "orderd $name exited at start (log: $logf)"; }
}

FAILED=0
top_procs "$RAW/top-before.txt"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 3. lag at a steady PlaceOrder load, next to the same load with the relay off ----------
# Per level: PlaceOrder through the relay-off orderd (the reference: what the write path
# does without a relay; its events are then deleted, no relay ever sees them), then through
# an orderd with the relay on, started for the level (the relay's connection and first
# rounds fall in the warm-up) and stopped after it.
stage_begin "lag: PlaceOrder at concurrency $CONCURRENCY, relay off (${TARGET[fill]}) then on (${TARGET[relay]})"
start_orderd fill fill 1 ORDERD_AMQP_ENABLED=false
tokens_and_products 1h "${TARGET[fill]}"
# Not measured: BENCH_ORDERS orders first, so that the first cell does not meet a cold
# database (empty tables, caches); their events are retired.
place_orders "${TARGET[fill]}" "the warm-up orders"
retire_unsent
for c in $CONCURRENCY; do
  "$PSQL" "${PGARGS[@]}" -d "$DB" -qXc "VACUUM ANALYZE" >/dev/null
  log "bench: off-c$c: PlaceOrder, relay off, concurrency $c, $(conns_for "$c") connections, $DURATION after $WARMUP"
  : >"$RAW/off-c$c.pgdb"
  bench_cell "off-c$c" "${TARGET[fill]}" "${PIDS[fill]}" place "$c" --products "$PRODUCTS"
  retire_unsent

  "$PSQL" "${PGARGS[@]}" -d "$DB" -qXc "VACUUM ANALYZE" >/dev/null
  purge_queues
  start_orderd relay "lag-c$c" 1 ORDERD_AMQP_ENABLED=true
  log "bench: lag-c$c: PlaceOrder, relay on, concurrency $c, $(conns_for "$c") connections, $DURATION after $WARMUP"
  : >"$RAW/lag-c$c.pgdb"
  bench_cell "lag-c$c" "${TARGET[relay]}" "${PIDS[relay]}" place "$c" --products "$PRODUCTS"
  # The measured window: orderd-bench's clock starts WARMUP after its channels are ready
  # (a few ms after the "before" reading).
  t0=$(sed -n 's/^before_time=//p' "$RAW/lag-c$c.cpu")
  ws=$(awk -v a="$t0" -v b="$WARMUP_S" 'BEGIN { printf "%.6f", a + b }')
  we=$(awk -v a="$ws" -v b="$DURATION_S" 'BEGIN { printf "%.6f", a + b }')
  for ((i = 0; i < 600; i++)); do
    [ "$(unpublished)" = 0 ] && break
    sleep 0.1
  done
  left=$(unpublished)
  if [ "$left" != 0 ]; then
    FAILED=1
    log "bench: lag-c$c: $left outbox rows still unpublished 60 s after the load ended; orderd's log:"
    tail -n 20 "$RAW/orderd-lag-c$c.log" >&2
  fi
  metrics relay "$RAW/lag-c$c.metrics"
  stop_orderd relay
  echo "{\"ws\": $ws, \"we\": $we, \"unpublished_after_60s\": $left}" >"$RAW/lag-c$c.window.json"
  lag_sql "$ws" "$we" >"$RAW/lag-c$c.sql.json"
  if [ "$left" != 0 ]; then retire_unsent; fi
done
q -c "SELECT payload::text FROM outbox WHERE routing_key = 'stock.reserve' ORDER BY seq DESC LIMIT 1" >"$RAW/body-stock.json"
q -c "SELECT payload::text FROM outbox WHERE routing_key = 'order.placed' ORDER BY seq DESC LIMIT 1" >"$RAW/body-order.json"
if [ ! -s "$RAW/body-stock.json" ] || [ ! -s "$RAW/body-order.json" ]; then die "no stock.reserve / order.placed event in the outbox"; fi
stage_end "done"

# ---- 4. drain rate, and the baseline ---------------------------------------------------------------
# claim_explain FILE BATCH: the relay's claim (a copy of SQL_CLAIM in storage/outbox.c: keep
# them the same), prepared as the relay prepares it, run once under EXPLAIN ANALYZE in a
# transaction that is rolled back: its plan and time at the current backlog and statistics.
claim_explain() {
  q -v batch="$2" >"$1" 2>&1 <<'SQL' || true
PREPARE bench_claim(int, bigint) AS
UPDATE outbox SET claimed_until = clock_timestamp() + $2::bigint * interval '1 microsecond',
  attempts = outbox.attempts + 1
 FROM (SELECT o.id FROM outbox o
  WHERE o.published_at IS NULL AND o.next_attempt_at <= clock_timestamp()
   AND (o.claimed_until IS NULL OR o.claimed_until < clock_timestamp())
   AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.order_id = o.order_id
    AND p.family = o.family AND p.published_at IS NULL AND p.seq < o.seq)
  ORDER BY o.seq LIMIT $1::int FOR UPDATE OF o SKIP LOCKED) c
 WHERE outbox.id = c.id
 RETURNING outbox.id;
BEGIN;
EXPLAIN (ANALYZE, COSTS OFF) EXECUTE bench_claim(:batch, 30000000);
ROLLBACK;
SQL
}

# drain_cell NAME BATCH STATS: RELAY_ORDERS orders through the relay-off orderd, then an
# orderd with the relay on (relay_batch BATCH), no RPC load, until the outbox is empty ->
# NAME.{cpu,pgdb,metrics,meta.json,sql.json,plan.txt}. STATS=fresh: the outbox is VACUUM
# ANALYZEd with the backlog in it; STATS=stale: analyzed before the backlog was written, with
# autovacuum off for the table until the drain ends, so the planner still believes that no
# row is unsent (as on a large outbox, where a backlog never reaches autovacuum's 10 %).
drain_cell() {
  local name=$1 b=$2 stats=$3 s0 s1 backlog deadline stuck n
  if [ "$stats" = stale ]; then
    q -c "ALTER TABLE outbox SET (autovacuum_enabled = false)" -c "VACUUM ANALYZE outbox" >/dev/null
  fi
  s0=$(max_seq)
  "$BENCH" --target "${TARGET[fill]}" --method place --token-file "$RAW/customer.token" --products "$PRODUCTS" \
    --requests "$RELAY_ORDERS" --warmup 0 --concurrency 8 --connections 8 --quiet \
    >"$RAW/fill-$name.txt" 2>&1 || { cat "$RAW/fill-$name.txt" >&2; die "placing the backlog's orders failed"; }
  s1=$(max_seq)
  backlog=$(unpublished)
  if [ "$stats" = fresh ]; then "$PSQL" "${PGARGS[@]}" -d "$DB" -qXc "VACUUM ANALYZE" >/dev/null; fi
  claim_explain "$RAW/$name.plan.txt" "$b"
  purge_queues
  log "bench: $name: backlog $backlog events ($stats statistics); orderd with the relay on, relay_batch $b, no RPC load"
  : >"$RAW/$name.cpu"
  : >"$RAW/$name.pgdb"
  cpu_snapshot "$RAW/$name.cpu" before ""
  start_orderd relay "$name" 0 ORDERD_AMQP_ENABLED=true ORDERD_AMQP_RELAY_BATCH="$b"
  # Polled through /metrics (no PostgreSQL connection per look): published_total counts
  # the rows this orderd marked sent; the outbox is checked once it says done.
  deadline=$((SECONDS + DRAIN_TIMEOUT))
  stuck=0
  while :; do
    kill -0 "${PIDS[relay]}" 2>/dev/null || { tail -n 30 "$RAW/orderd-$name.log" >&2; unset "PIDS[relay]"; die "orderd (relay_batch $b) exited during the drain"; }
    n=$(curl -fsS --max-time 1 "http://${HTTP[relay]}/metrics" 2>/dev/null |
      awk '$1 == "orderd_outbox_published_total" { print $2 }' || true)
    if [ -n "$n" ] && [ "$n" -ge "$backlog" ] && [ "$(unpublished)" = 0 ]; then break; fi
    if [ "$SECONDS" -ge "$deadline" ]; then stuck=1; break; fi
    sleep 0.1
  done
  cpu_snapshot "$RAW/$name.cpu" after "${PIDS[relay]}"
  metrics relay "$RAW/$name.metrics"
  stop_orderd relay
  if [ "$stuck" = 1 ]; then
    FAILED=1
    log "bench: $name: $(unpublished) rows still unpublished after ${DRAIN_TIMEOUT}s; orderd's log:"
    tail -n 20 "$RAW/orderd-$name.log" >&2
  fi
  if [ "$stats" = stale ]; then q -c "ALTER TABLE outbox RESET (autovacuum_enabled)" >/dev/null; fi
  echo "{\"batch\": $b, \"stats\": \"$stats\", \"backlog\": $backlog, \"s0\": $s0, \"s1\": $s1, \"stuck\": $stuck, \"queues\": \"$(amqp_tool count --queue "$STOCK_Q" --queue "$ORDER_Q" | tr '\n' ' ')\"}" >"$RAW/$name.meta.json"
  drain_sql "$s0" "$s1" >"$RAW/$name.sql.json"
  # Whatever a stuck drain left is retired, so that the next cell starts from an empty backlog.
  if [ "$stuck" = 1 ]; then retire_unsent; fi
  DRAINED=$backlog
}

# base_cell NAME BATCH MESSAGES: amqp-baseline -> NAME.{json,txt,cpu}
base_cell() {
  purge_queues
  log "bench: $1: amqp-baseline, $3 messages in batches of $2"
  : >"$RAW/$1.cpu"
  : >"$RAW/$1.pgdb"
  cpu_snapshot "$RAW/$1.cpu" before ""
  if ! amqp_tool publish --exchange "$EXCHANGE" --messages "$3" --batch "$2" \
    --message "stock.reserve=$RAW/body-stock.json" --message "order.placed=$RAW/body-order.json" \
    --json >"$RAW/$1.json" 2>"$RAW/$1.txt"; then
    FAILED=1
    log "bench: $1: amqp-baseline failed:"
    cat "$RAW/$1.txt" "$RAW/$1.json" >&2
  fi
  cpu_snapshot "$RAW/$1.cpu" after ""
}

stage_begin "drain: $RELAY_ORDERS orders through the relay-off orderd, then the relay alone: batches $BATCHES${STALE_BATCHES:+, and $STALE_BATCHES with stale statistics}"
DRAINED=0
for b in $BATCHES; do
  drain_cell "drain-b$b" "$b" fresh
  base_cell "base-b$b" "$b" "$DRAINED"
done
for b in $STALE_BATCHES; do
  drain_cell "stale-b$b" "$b" stale
done
purge_queues
stop_orderd fill
stage_end "done"

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
top_procs "$RAW/top-after.txt"
grep -h '"level":"\(warn\|error\)"' "$RAW"/orderd-*.log >"$RAW/warnings.txt" 2>/dev/null || true
teardown_topology

# ---- 5. report ---------------------------------------------------------------------------------
cat >"$RAW/meta.json" <<EOF
{"concurrency": "$CONCURRENCY", "duration": "$DURATION", "warmup": "$WARMUP",
 "connections": "$CONNECTIONS", "threads": $THREADS, "workers": "${WORKERS:-8 (config.yaml)}",
 "relay_orders": $RELAY_ORDERS, "batches": "$BATCHES", "stale_batches": "$STALE_BATCHES", "exchange": "$EXCHANGE",
 "queues": "$STOCK_Q, $ORDER_Q", "clk_tck": $(getconf CLK_TCK), "cores": $(nproc),
 "mem_gib": $(awk '/^MemTotal/ { printf "%d", $2 / 1048576 }' /proc/meminfo),
 "cpu": "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)",
 "commit": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')",
 "dirty": "$(if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then echo yes; else echo no; fi)",
 "postgres": "$("$PSQL" "${PGARGS[@]}" -d postgres -XtAc 'SHOW server_version' 2>/dev/null || echo '?')",
 "rabbitmq": "$(find /usr/lib/rabbitmq/lib -maxdepth 1 -name 'rabbitmq_server-*' 2>/dev/null | sed 's/.*-//' | head -n 1)",
 "librabbitmq": "$(pkg-config --modversion librabbitmq 2>/dev/null || echo '?')",
 "rmq_note": "$RMQ_NOTE", "amqp": "$AMQP_SHOWN",
 "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER",
 "date": "$(date -u '+%Y-%m-%d %H:%M UTC')", "raw": "${RAW#"$ROOT"/}"}
EOF
"$PY" "$ROOT/bench/relay_report.py" "$RAW" | tee "$REPORT"
log "bench: report written to ${REPORT#"$ROOT"/}"
if [ "$FAILED" != 0 ]; then
  log "bench: something failed; see above and $RAW/"
  exit 1
fi
