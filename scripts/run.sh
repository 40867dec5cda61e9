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

usage() {
  cat <<'EOF2'
usage: scripts/run.sh [--fake-providers]

  --fake-providers  also start the local Stripe and PayPal fakes of tests/fakes on
                    127.0.0.1:58111 and 127.0.0.1:58112 and point orderd at them (no
                    account, no network): PAYMENT_PROVIDER_STRIPE and _PAYPAL then work,
                    and scripts/send-webhook delivers their signed webhooks.
EOF2
}
FAKES=0
for arg in "$@"; do
  case "$arg" in
  --fake-providers) FAKES=1 ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
  esac
done

CONFIG=config.yaml
ORDERD_PID=""
FAKE_PIDS=() # the provider fakes this script started
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
  for i in "${FAKE_PIDS[@]}"; do
    kill -TERM "$i" 2>/dev/null && wait "$i" 2>/dev/null
  done
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
# start_fake NAME PORT ARGS...: runs tests/fakes/fake_NAME.py on 127.0.0.1:PORT in a
# session of its own (Ctrl-C reaches it only through cleanup, after orderd has drained)
# and waits until it listens.
start_fake() {
  local name=$1 port=$2 out="$ORDERD_LOCAL/run/fake-$1.log" i
  shift 2
  mkdir -p "$ORDERD_LOCAL/run"
  setsid /usr/bin/python3 tests/fakes/fake_"$name".py --port "$port" "$@" >"$out" 2>&1 &
  FAKE_PIDS+=("$!")
  for ((i = 0; i < 100; i++)); do
    grep -q '^LISTENING' "$out" 2>/dev/null && { log "fake $name: http://127.0.0.1:$port"; return 0; }
    kill -0 "${FAKE_PIDS[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  die "the $name fake did not start on 127.0.0.1:$port (is the port taken?): $(tail -n 3 "$out")"
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

if [ "$FAKES" = 1 ]; then
  stage_begin "provider fakes (tests/fakes)"
  start_fake stripe "$FAKE_STRIPE_PORT" --key "$FAKE_STRIPE_KEY"
  start_fake paypal "$FAKE_PAYPAL_PORT" --client-id "$FAKE_PAYPAL_CLIENT_ID" \
    --client-secret "$FAKE_PAYPAL_SECRET" --webhook-id "$FAKE_PAYPAL_WEBHOOK_ID"
  # The fakes' test credentials, handed to orderd the way real ones are: the environment.
  export ORDERD_PAYMENTS_STRIPE_ENABLED=true \
    ORDERD_PAYMENTS_STRIPE_API_BASE="http://127.0.0.1:$FAKE_STRIPE_PORT" \
    ORDERD_PAYMENTS_STRIPE_SECRET_KEY="$FAKE_STRIPE_KEY" \
    ORDERD_PAYMENTS_STRIPE_WEBHOOK_SECRET="$FAKE_STRIPE_WEBHOOK_SECRET" \
    ORDERD_PAYMENTS_PAYPAL_ENABLED=true \
    ORDERD_PAYMENTS_PAYPAL_API_BASE="http://127.0.0.1:$FAKE_PAYPAL_PORT" \
    ORDERD_PAYMENTS_PAYPAL_CLIENT_ID="$FAKE_PAYPAL_CLIENT_ID" \
    ORDERD_PAYMENTS_PAYPAL_CLIENT_SECRET="$FAKE_PAYPAL_SECRET" \
    ORDERD_PAYMENTS_PAYPAL_WEBHOOK_ID="$FAKE_PAYPAL_WEBHOOK_ID"
  stage_end ok
fi

listen=${ORDERD_SERVER_LISTEN:-$(awk '/^server:/ {s = 1} s && $1 == "listen:" {print $2; exit}' "$CONFIG")}
http_listen=${ORDERD_HTTP_LISTEN:-$(awk '/^http:/ {s = 1} s && $1 == "listen:" {print $2; exit}' "$CONFIG")}
cat >&2 <<EOF

orderd is starting on $listen. In another terminal (grpcurl is not packaged by Debian:
https://github.com/fullstorydev/grpcurl/releases):

  TOKEN=\$(build/orderd token --subject alice --role customer)
  ADMIN=\$(build/orderd token --subject root --role admin)   # reflection needs admin
  grpcurl -plaintext -reflect-header "authorization: Bearer \$ADMIN" \\
    -rpc-header "authorization: Bearer \$TOKEN" \\
    -d '{"request_id": "demo-1", "items": [{"product_id": "sku-espresso", "quantity": 2}], "payment_provider": "PAYMENT_PROVIDER_LOCAL"}' \\
    $listen orders.v1.OrderService/PlaceOrder

Metrics and health: curl http://$http_listen/metrics, curl http://$http_listen/healthz
(webhooks: POST /webhooks/stripe and /webhooks/paypal on the same port, once a provider
is enabled in config.yaml or by --fake-providers). Events go to the exchange orderd.events
on the stack's RabbitMQ (amqp://guest:guest@127.0.0.1:55672/): queues inventory.stock and
notifications.orders.

Demo products: scripts/demo-products.sql. Ctrl-C stops orderd (and the stack, if this
script started it).

EOF
if [ "$FAKES" = 1 ]; then
  cat >&2 <<EOF
Stripe and PayPal are the local fakes (http://127.0.0.1:$FAKE_STRIPE_PORT, http://127.0.0.1:$FAKE_PAYPAL_PORT).
The customer pays:  curl -s -XPOST 127.0.0.1:$FAKE_STRIPE_PORT/_fake/pay -d '{"id":"pi_..."}'
                    curl -s -XPOST 127.0.0.1:$FAKE_PAYPAL_PORT/_fake/pay -d '{"id":"<PayPal order id>"}'
then ConfirmPayment, or the provider tells orderd:
                    scripts/send-webhook stripe payment_intent.succeeded pi_...
README.md ("Stripe and PayPal on this machine") walks through it.

EOF
fi

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
