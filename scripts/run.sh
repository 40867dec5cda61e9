#!/usr/bin/env bash
# The README's run command: installs what is missing, builds, starts the private local
# stack, prepares the database and runs orderd in the foreground.
#
# Ctrl-C (or SIGTERM to this script) lets orderd drain and exit; then the stack is stopped
# again, unless it was already running before this script started (left as it was).
# orderd runs in a session of its own and gets exactly one signal from this script, so
# it is not hit twice by one Ctrl-C (the terminal's and ours).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ORDERD_ROOT"

CONFIG=config.yaml
ORDERD_PID=""
STACK_STARTED="" # components this script started, hence stops
STACK_CHECKED=0  # set once STACK_STARTED is known

orderd_alive() { [ -n "$ORDERD_PID" ] && kill -0 "$ORDERD_PID" 2>/dev/null; }

# shellcheck disable=SC2317 # called from traps
cleanup() {
  local rc=$? i
  set +e # every step below must run, whatever failed before or fails now
  trap '' INT TERM HUP
  # If our output is a dead pipe, send the rest to /dev/null: the scripts run below would
  # otherwise stop at their first failed write (set -e) and leave servers behind.
  if ! printf 'run: cleaning up\n' >&2 2>/dev/null; then exec >/dev/null 2>&1; fi # finish cleaning up; a second Ctrl-C must not leave servers behind
  if orderd_alive; then
    # Only on an error path: a signal has been forwarded already and waited for.
    log "run: stopping orderd (pid $ORDERD_PID)"
    kill -TERM "$ORDERD_PID" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do orderd_alive || break; sleep 0.1; done
    if orderd_alive; then kill -KILL "$ORDERD_PID" 2>/dev/null || true; fi
  fi
  if [ -n "$STACK_STARTED" ]; then
    log "run: stopping the local stack ($STACK_STARTED)"
    # shellcheck disable=SC2086 # a list of component names
    bash scripts/stack.sh stop $STACK_STARTED || rc=1
  elif [ "$STACK_CHECKED" = 1 ]; then
    log "run: the local stack was running before this script; left running (scripts/stack.sh stop)"
  fi
  exit "$rc"
}

# Before orderd runs, a signal ends the script (the EXIT trap cleans up). While it runs,
# the signal is handed on to orderd and the script waits for it to drain.
# shellcheck disable=SC2317 # called from traps
on_signal() {
  local sig=$1 code=$2
  if orderd_alive; then
    log "run: $sig: asking orderd to drain and stop"
    kill -"$sig" "$ORDERD_PID" 2>/dev/null || true
  else
    exit "$code"
  fi
}
trap cleanup EXIT
# A dead reader of our output (`scripts/run.sh | tee log`, then Ctrl-C kills tee) must
# not kill this script by SIGPIPE before it has stopped orderd and the stack.
trap '' PIPE
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal TERM 129' HUP

stage_begin "dependencies (scripts/deps.sh)"
bash scripts/deps.sh
stage_end ok

stage_begin "build (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j2
stage_end ok

stage_begin "local stack"
STACK_STARTED=$(stack_components_down)
STACK_CHECKED=1
bash scripts/stack.sh start
stage_end ok

stage_begin "database"
ensure_dev_secrets
build/orderd migrate --config "$CONFIG"
"$(pg_bindir)/psql" "${STACK_PG_ARGS[@]}" -d orderd -X -q -v ON_ERROR_STOP=1 \
  -f scripts/demo-products.sql
stage_end ok

listen=${ORDERD_SERVER_LISTEN:-$(awk '/^server:/ {s = 1} s && $1 == "listen:" {print $2; exit}' "$CONFIG")}
cat >&2 <<EOF

orderd is starting on $listen. In another terminal (grpcurl is not packaged by Debian:
https://github.com/fullstorydev/grpcurl/releases):

  TOKEN=\$(build/orderd token --subject alice --role customer)
  ADMIN=\$(build/orderd token --subject root --role admin)   # reflection needs admin
  grpcurl -plaintext -reflect-header "authorization: Bearer \$ADMIN" \\
    -rpc-header "authorization: Bearer \$TOKEN" \\
    -d '{"request_id": "demo-1", "items": [{"product_id": "sku-espresso", "quantity": 2}], "payment_provider": "PAYMENT_PROVIDER_LOCAL"}' \\
    $listen orders.v1.OrderService/PlaceOrder

Metrics and health: curl http://127.0.0.1:58080/metrics, curl http://127.0.0.1:58080/healthz
(webhooks: POST /webhooks/stripe and /webhooks/paypal on the same port, once a provider is
enabled in config.yaml). Events go to the exchange orderd.events on the stack's RabbitMQ
(amqp://guest:guest@127.0.0.1:55672/): queues inventory.stock and notifications.orders.

Demo products: scripts/demo-products.sql. Ctrl-C stops orderd (and the stack, if this
script started it).

EOF

# A session of its own: the terminal's Ctrl-C reaches this script only, which hands it on.
# env --default-signal: bash starts background commands with SIGINT ignored; undo that.
setsid env --default-signal=INT,QUIT build/orderd serve --config "$CONFIG" &
ORDERD_PID=$!
orderd_rc=0
while :; do
  # wait returns early (status > 128) when a trapped signal arrives; orderd is then still
  # draining, so wait again until it has really exited.
  wait "$ORDERD_PID" && orderd_rc=0 || orderd_rc=$?
  orderd_alive || break
done
log "run: orderd exited with status $orderd_rc"
exit "$orderd_rc"
