# shellcheck shell=bash disable=SC2034 # constants used by the scripts that source this file
# Shared by scripts/stack.sh, scripts/run.sh and scripts/test.sh (sourced, never run):
# where the checkout is, the private stack's ports and connection strings, stage logging
# and the development secrets.

ORDERD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
ORDERD_LOCAL="$ORDERD_ROOT/.local"

# The private stack: loopback only, ports that no default installation uses.
STACK_PG_PORT=55432
STACK_REDIS_PORT=56379
STACK_AMQP_PORT=55672
STACK_RMQ_DIST_PORT=45672
STACK_EPMD_PORT=54369
STACK_RMQ_NODE=orderd@localhost

# The provider fakes `scripts/run.sh --fake-providers` starts (tests/fakes), and the test
# credentials it gives them and orderd. Test values only: real keys never live here.
FAKE_STRIPE_PORT=58111
FAKE_PAYPAL_PORT=58112
FAKE_STRIPE_KEY=sk_test_orderd_fake
FAKE_STRIPE_WEBHOOK_SECRET=whsec_orderd_fake
FAKE_PAYPAL_CLIENT_ID=orderd-fake-client
FAKE_PAYPAL_SECRET=orderd-fake-secret
FAKE_PAYPAL_WEBHOOK_ID=WH-ORDERD-FAKE

STACK_PG_DSN="host=127.0.0.1 port=$STACK_PG_PORT dbname=orderd user=orderd"
STACK_REDIS="127.0.0.1:$STACK_REDIS_PORT"
STACK_AMQP_URL="amqp://guest:guest@127.0.0.1:$STACK_AMQP_PORT/"

# psql/createdb/dropdb against the stack's server (trust auth on loopback, no password).
STACK_PG_ARGS=(-h 127.0.0.1 -p "$STACK_PG_PORT" -U orderd)

# The PostgreSQL client binaries of the server version the stack runs.
pg_bindir() {
  local d
  if [ -x /usr/lib/postgresql/15/bin/pg_ctl ]; then
    echo /usr/lib/postgresql/15/bin
    return 0
  fi
  for d in $(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V -r); do
    if [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}

# ---- logging -----------------------------------------------------------------
_stage_t0=0
_stage_name=""
log() { printf '%s\n' "$*" >&2 || true; } # never fatal: stderr may be a dead pipe
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

stage_begin() {
  _stage_name="$1"
  _stage_t0=$SECONDS
  printf '\n==> %s\n' "$_stage_name" >&2
}

# stage_end RESULT: prints "<== name: RESULT (Ns)" and returns the elapsed seconds in
# STAGE_ELAPSED.
stage_end() {
  STAGE_ELAPSED=$((SECONDS - _stage_t0))
  printf '<== %s: %s (%ds)\n' "$_stage_name" "$1" "$STAGE_ELAPSED" >&2
}

# ---- development secrets -------------------------------------------------------
# config.yaml names .local/secrets/jwt-hs256 and .local/secrets/page-token. Each is
# generated once (random, mode 600) and then kept, so tokens minted earlier stay valid.
ensure_dev_secrets() {
  local dir="$ORDERD_LOCAL/secrets" f
  mkdir -p "$dir"
  chmod 700 "$dir"
  for f in jwt-hs256 page-token; do
    if [ ! -s "$dir/$f" ]; then
      (umask 077 && head -c 48 /dev/urandom | base64 -w0 >"$dir/$f.tmp" && mv "$dir/$f.tmp" "$dir/$f")
      log "secrets: generated .local/secrets/$f"
    fi
    chmod 600 "$dir/$f"
  done
}

# ---- the stack, as seen by run.sh and test.sh ----------------------------------
STACK_COMPONENTS=(pg redis rabbitmq)

# Prints the components of the stack that are not running now (what a `stack.sh start`
# would start, hence what the caller should stop again when it is done).
stack_components_down() {
  local c down=()
  for c in "${STACK_COMPONENTS[@]}"; do
    if ! "$ORDERD_ROOT/scripts/stack.sh" status "$c" >/dev/null 2>&1; then
      down+=("$c")
    fi
  done
  echo "${down[*]}"
}
