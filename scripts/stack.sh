#!/usr/bin/env bash
# A private PostgreSQL + Redis + RabbitMQ for development and tests, on loopback ports
# of its own, data under .local/stack/ of this checkout. A developer's own servers on the
# default ports are never touched.
#
#   scripts/stack.sh start  [pg|redis|rabbitmq ...]   start (what is not running yet)
#   scripts/stack.sh stop   [pg|redis|rabbitmq ...]   stop what this script started
#   scripts/stack.sh status [pg|redis|rabbitmq ...]   exit 0 when all named are running
#   scripts/stack.sh env                              export lines for a shell: eval
#   scripts/stack.sh rabbitmqctl ARGS...              rabbitmqctl against the stack's node
#
# RabbitMQ also listens for AMQP over TLS (amqps) on 127.0.0.1:55671 (STACK_AMQPS_PORT),
# with a throwaway CA and certificates made once in .local/stack/rabbitmq/tls/.
#
# Every server is started in a session of its own (setsid), so a Ctrl-C in the terminal
# does not reach it; stop (or the scripts that called start) stops it explicitly. Stop
# finds the servers by their pid files and node name only, never by process name.
#
# PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres` OS
# user (created by Debian's postgresql package, or `orderd-pg` created here). When that
# user cannot reach .local/stack/ (a checkout under /root, say), or the socket path would
# be too long, the cluster lives in /tmp/orderd-stack-<hash of the checkout path>/ and
# .local/stack/pg.location says so.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STACK_DIR="$ORDERD_LOCAL/stack"
RMQ_DIR="$STACK_DIR/rabbitmq"
RMQ_TLS_DIR="$RMQ_DIR/tls"
# amqps (AMQP over TLS), beside STACK_AMQP_PORT; the other scripts learn it (and the TLS
# directory) from `stack.sh env`.
STACK_AMQPS_PORT=55671
REDIS_DIR="$STACK_DIR/redis"
RMQ_SBIN=/usr/lib/rabbitmq/bin # not /usr/sbin: Debian's wrappers switch to the rabbitmq user
START_TIMEOUT=60

# ---- helpers -------------------------------------------------------------------
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# pid_is PID COMM: PID is alive and its command name is COMM.
pid_is() {
  [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

pidfile_pid() { [ -s "$1" ] && head -n 1 "$1" | tr -dc '0-9'; }

# wait_gone PID SECONDS: 0 once PID has exited.
wait_gone() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# terminate PID COMM SECONDS: SIGTERM, then SIGKILL when it is still there after SECONDS.
terminate() {
  pid_is "$1" "$2" || return 0
  kill -TERM "$1" 2>/dev/null || true
  if ! wait_gone "$1" "$3"; then
    log "$2 (pid $1) did not exit after ${3}s; killing it"
    kill -KILL "$1" 2>/dev/null || true
    wait_gone "$1" 10 || log "$2 (pid $1) is still there"
  fi
}

tail_log() {
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    log "---- last lines of $f"
    tail -n 30 "$f" >&2 || true
  done
}

# ---- PostgreSQL ------------------------------------------------------------------
PG_BIN=$(pg_bindir || true)
PG_OS_USER=""
PG_BASE=""
PG_DATA=""

pg_os_user() {
  if [ "$(id -u)" -ne 0 ]; then
    PG_OS_USER=$(id -un)
  elif getent passwd postgres >/dev/null; then
    PG_OS_USER=postgres
  else
    PG_OS_USER=orderd-pg
    if ! getent passwd "$PG_OS_USER" >/dev/null; then
      useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$PG_OS_USER"
    fi
  fi
}

# as_pg CMD...: CMD as the PostgreSQL OS user, from /, with no lock fd inherited.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u "$PG_OS_USER" -- "$@" 9>&-)
  else
    (cd / && "$@" 9>&-)
  fi
}

# write_as_pg FILE: stdin to FILE, owned by the PostgreSQL OS user.
write_as_pg() {
  cat >"$1"
  if [ "$(id -u)" -eq 0 ]; then chown "$PG_OS_USER:" "$1"; fi
}

# pg_locate: sets PG_BASE/PG_DATA from .local/stack/pg.location; 1 when never set up.
pg_locate() {
  [ -s "$STACK_DIR/pg.location" ] || return 1
  PG_BASE=$(cat "$STACK_DIR/pg.location")
  PG_DATA="$PG_BASE/data"
}

# pg_choose_base: decides where the cluster lives (first start only) and records it.
pg_choose_base() {
  local base="$STACK_DIR/pg" sock_len
  sock_len=$(printf '%s' "$base/data/.s.PGSQL.$STACK_PG_PORT" | wc -c)
  mkdir -p "$base"
  if [ "$(id -u)" -eq 0 ]; then chown "$PG_OS_USER:" "$base"; fi
  chmod 700 "$base"
  if [ "$sock_len" -gt 100 ] || ! as_pg test -w "$base" -a -x "$base"; then
    rmdir "$base" 2>/dev/null || true
    base="/tmp/orderd-stack-$(printf '%s' "$ORDERD_ROOT" | sha256sum | cut -c1-12)"
    if [ -L "$base" ] || { [ -e "$base" ] && [ "$(stat -c %u "$base")" != "$(id -u)" ] &&
      [ "$(stat -c %U "$base")" != "$PG_OS_USER" ]; }; then
      die "pg: $base exists and is not ours; remove it"
    fi
    [ -d "$base" ] || mkdir -m 700 "$base"
    if [ "$(id -u)" -eq 0 ]; then chown "$PG_OS_USER:" "$base"; fi
    log "pg: $PG_OS_USER cannot use $STACK_DIR/pg; the cluster lives in $base"
  fi
  printf '%s\n' "$base" >"$STACK_DIR/pg.location"
  PG_BASE="$base"
  PG_DATA="$base/data"
}

pg_pid() {
  local pid
  [ -n "$PG_DATA" ] || return 1
  pid=$(pidfile_pid "$PG_DATA/postmaster.pid") || return 1
  pid_is "$pid" postgres || return 1
  echo "$pid"
}

pg_running() { pg_locate && pg_pid >/dev/null; }

pg_initdb() {
  [ -f "$PG_DATA/PG_VERSION" ] && return 0
  log "pg: initdb in $PG_DATA"
  rm -rf "$PG_DATA.init"
  # Initialised beside the final place and renamed, so an interrupted initdb never leaves
  # a half-made cluster behind.
  if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA.init" -U orderd --auth=trust -E UTF8 \
    --locale=C.UTF-8 --no-instructions >"$PG_BASE/initdb.log" 2>&1; then
    tail_log "$PG_BASE/initdb.log"
    die "pg: initdb failed"
  fi
  # Loopback and the socket inside the data directory only; trust, it is a private stack.
  write_as_pg "$PG_DATA.init/pg_hba.conf" <<EOF
# orderd private stack: loopback only, no passwords.
local all all              trust
host  all all 127.0.0.1/32 trust
EOF
  echo "include = 'orderd-stack.conf'" >>"$PG_DATA.init/postgresql.conf"
  mv "$PG_DATA.init" "$PG_DATA"
}

pg_write_conf() {
  # Rewritten at every start, so a change here takes effect on the next start.
  write_as_pg "$PG_DATA/orderd-stack.conf" <<EOF
# Written by scripts/stack.sh at every start; edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $STACK_PG_PORT
unix_socket_directories = '$PG_DATA'
max_connections = 300
shared_buffers = 128MB
# A disposable dev/test stack: no crash safety needed. synchronous_commit stays on.
fsync = off
full_page_writes = off
log_line_prefix = '%m [%p] %q%u@%d '
log_min_duration_statement = -1
EOF
}

pg_start() {
  [ -n "$PG_BIN" ] || die "pg: PostgreSQL binaries not found (run scripts/deps.sh)"
  pg_os_user
  # A recorded place under /tmp may be gone (reboot): then choose (and initdb) again.
  { pg_locate && [ -d "$PG_BASE" ]; } || pg_choose_base
  local pid
  if pid=$(pg_pid); then
    log "pg: already running (pid $pid)"
  else
    port_open "$STACK_PG_PORT" && die "pg: 127.0.0.1:$STACK_PG_PORT is in use by a process that is not this stack's"
    pg_initdb
    pg_write_conf
    log "pg: starting on 127.0.0.1:$STACK_PG_PORT"
    if ! as_pg setsid -w "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_BASE/postgres.log" \
      -w -t "$START_TIMEOUT" -s start; then
      tail_log "$PG_BASE/postgres.log"
      die "pg: did not start"
    fi
  fi
  if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$STACK_PG_PORT" -t "$START_TIMEOUT"; then
    tail_log "$PG_BASE/postgres.log"
    die "pg: not answering on 127.0.0.1:$STACK_PG_PORT"
  fi
  if [ "$("$PG_BIN/psql" "${STACK_PG_ARGS[@]}" -d postgres -XtAc \
    "SELECT 1 FROM pg_database WHERE datname = 'orderd'")" != 1 ]; then
    "$PG_BIN/createdb" "${STACK_PG_ARGS[@]}" -O orderd orderd
    log "pg: created database orderd"
  fi
}

pg_stop() {
  local pid
  pg_locate || { log "pg: not set up"; return 0; }
  if ! pid=$(pg_pid); then
    log "pg: not running"
    return 0
  fi
  pg_os_user
  log "pg: stopping (pid $pid)"
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop; then
    log "pg: pg_ctl stop failed"
  fi
  terminate "$pid" postgres 30
}

pg_status() {
  local pid
  if pg_locate && pid=$(pg_pid) &&
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$STACK_PG_PORT" -t 2; then
    echo "pg:       running (pid $pid) 127.0.0.1:$STACK_PG_PORT, data $PG_DATA"
    return 0
  fi
  echo "pg:       stopped"
  return 1
}

# ---- Redis -------------------------------------------------------------------------
redis_pid() {
  local pid
  pid=$(pidfile_pid "$REDIS_DIR/redis.pid") || return 1
  pid_is "$pid" redis-server || return 1
  echo "$pid"
}

redis_ping() {
  [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$STACK_REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

redis_start() {
  local pid i
  if pid=$(redis_pid); then
    log "redis: already running (pid $pid)"
  else
    command -v redis-server >/dev/null || die "redis: redis-server not found (run scripts/deps.sh)"
    port_open "$STACK_REDIS_PORT" && die "redis: 127.0.0.1:$STACK_REDIS_PORT is in use by a process that is not this stack's"
    mkdir -p "$REDIS_DIR"
    cat >"$REDIS_DIR/redis.conf" <<EOF
# Written by scripts/stack.sh at every start; edit the script, not this file.
bind 127.0.0.1
port $STACK_REDIS_PORT
protected-mode yes
daemonize yes
pidfile "$REDIS_DIR/redis.pid"
logfile "$REDIS_DIR/redis.log"
dir "$REDIS_DIR"
# Holds only what can be lost: no persistence at all.
save ""
appendonly no
EOF
    rm -f "$REDIS_DIR/redis.pid"
    log "redis: starting on 127.0.0.1:$STACK_REDIS_PORT"
    if ! setsid -w redis-server "$REDIS_DIR/redis.conf" 9>&-; then
      tail_log "$REDIS_DIR/redis.log"
      die "redis: did not start"
    fi
  fi
  for ((i = 0; i < START_TIMEOUT * 5; i++)); do
    redis_ping && return 0
    sleep 0.2
  done
  tail_log "$REDIS_DIR/redis.log"
  die "redis: not answering on 127.0.0.1:$STACK_REDIS_PORT"
}

redis_stop() {
  local pid
  if ! pid=$(redis_pid); then
    log "redis: not running"
    return 0
  fi
  log "redis: stopping (pid $pid)"
  terminate "$pid" redis-server 30
}

redis_status() {
  local pid
  if pid=$(redis_pid) && redis_ping; then
    echo "redis:    running (pid $pid) 127.0.0.1:$STACK_REDIS_PORT"
    return 0
  fi
  echo "redis:    stopped"
  return 1
}

# ---- RabbitMQ ------------------------------------------------------------------------
rmq_env() {
  export RABBITMQ_NODENAME="$STACK_RMQ_NODE"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$STACK_AMQP_PORT"
  export RABBITMQ_DIST_PORT="$STACK_RMQ_DIST_PORT"
  export ERL_EPMD_PORT="$STACK_EPMD_PORT"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
  export RABBITMQ_LOG_BASE="$RMQ_DIR/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
  export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
  export RABBITMQ_PID_FILE="$RMQ_DIR/orderd.pid"
  # Erlang distribution on loopback only, and epmd is ours (started below), never
  # started implicitly by the server or by a CLI call.
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"
  export RABBITMQ_CTL_ERL_ARGS="-start_epmd false"
  # The CLI tools' own distribution ports (default 35672-35682, shared with any other
  # RabbitMQ on the machine).
  export RABBITMQ_CTL_DIST_PORT_MIN=$((STACK_RMQ_DIST_PORT + 8))
  export RABBITMQ_CTL_DIST_PORT_MAX=$((STACK_RMQ_DIST_PORT + 18))
  export HOME="$RMQ_DIR/home" # the Erlang cookie
}

# --foreground: a Ctrl-C during start reaches the CLI instead of being held off for 90 s.
rmqctl() { (rmq_env && timeout --foreground 90 "$RMQ_SBIN/rabbitmqctl" -n "$STACK_RMQ_NODE" "$@" 9>&-); }

rmq_pid() {
  local pid
  pid=$(pidfile_pid "$RMQ_DIR/orderd.pid") || return 1
  pid_is "$pid" beam.smp || return 1
  echo "$pid"
}

# The epmd this stack started: the one whose command line names our port.
epmd_pids() {
  local p
  for p in $(pgrep -x epmd 2>/dev/null); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "-port $STACK_EPMD_PORT "; then
      echo "$p"
    fi
  done
}

epmd_start() {
  local i
  [ -n "$(epmd_pids)" ] && return 0
  port_open "$STACK_EPMD_PORT" && die "rabbitmq: epmd port 127.0.0.1:$STACK_EPMD_PORT is in use by a process that is not this stack's"
  (cd / && setsid -w epmd -daemon -port "$STACK_EPMD_PORT" -address 127.0.0.1 9>&-)
  for ((i = 0; i < 50; i++)); do
    port_open "$STACK_EPMD_PORT" && return 0
    sleep 0.1
  done
  die "rabbitmq: epmd did not start on 127.0.0.1:$STACK_EPMD_PORT"
}

epmd_stop() {
  local p
  [ -n "$(epmd_pids)" ] || return 0
  (cd / && epmd -port "$STACK_EPMD_PORT" -kill >/dev/null 2>&1) || true
  for p in $(epmd_pids); do terminate "$p" epmd 10; done
}

# amqp_login USER PASS: 0 when an AMQP connection to the stack logs in.
amqp_login() {
  /usr/bin/python3 - "$1" "$2" "$STACK_AMQP_PORT" <<'EOF' >/dev/null 2>&1
import sys, pika
p = pika.ConnectionParameters("127.0.0.1", int(sys.argv[3]), "/",
                              pika.PlainCredentials(sys.argv[1], sys.argv[2]),
                              connection_attempts=1, socket_timeout=5)
pika.BlockingConnection(p).close()
EOF
}

# rmq_tls_ensure: the files of the TLS listener and of the TLS tests, made once with the
# openssl CLI and then kept (remade only when one is missing or expires within a day):
#   ca.crt, ca.key                  a throwaway CA
#   server.crt, server.key          CN=localhost, subjectAltName DNS:localhost,IP:127.0.0.1
#   client.crt, client.key          a client certificate signed by the same CA
#   other-ca.crt, other-client.*    an unrelated CA and a client certificate of its own:
#                                   what orderd and the broker must each refuse
# The directory is mode 700 and every file 600: only the user running the stack reads
# them (RabbitMQ runs as that user here, root under CI, and so do the tests). Made in a
# sibling directory and renamed, so an interrupted run never leaves half a set behind.
rmq_tls_ensure() {
  local d="$RMQ_TLS_DIR" f complete=1
  for f in ca.crt ca.key server.crt server.key client.crt client.key other-ca.crt \
    other-client.crt other-client.key; do
    [ -s "$d/$f" ] || complete=0
  done
  if [ "$complete" = 1 ]; then
    for f in ca.crt server.crt client.crt other-ca.crt other-client.crt; do
      openssl x509 -checkend 86400 -noout -in "$d/$f" >/dev/null 2>&1 || complete=0
    done
  fi
  if [ "$complete" = 1 ]; then
    chmod 700 "$d"
    chmod 600 "$d"/*
    return 0
  fi
  command -v openssl >/dev/null || die "rabbitmq: openssl not found (run scripts/deps.sh)"
  local tmp="$d.new"
  rm -rf "$tmp"
  (umask 077 && mkdir "$tmp")
  if ! (cd "$tmp" && umask 077 && rmq_tls_make) >"$RMQ_DIR/tls-gen.log" 2>&1; then
    tail_log "$RMQ_DIR/tls-gen.log"
    rm -rf "$tmp"
    die "rabbitmq: could not make the TLS certificates"
  fi
  rm -rf "$d"
  mv "$tmp" "$d"
  rm -f "$RMQ_DIR/tls-gen.log"
  log "rabbitmq: made a throwaway CA and certificates in $d"
}

# rmq_tls_make: the certificates, in the current directory (rmq_tls_ensure's subshell).
# Every step is checked: errexit does not apply inside an `if` condition.
rmq_tls_make() {
  local ca
  case "$PWD" in */tls.new) ;; *) return 1 ;; esac # it cleans up with globs below
  printf '%s\n' \
    '[ca]' \
    'basicConstraints = critical,CA:TRUE' \
    'keyUsage = critical,keyCertSign,cRLSign' \
    'subjectKeyIdentifier = hash' \
    '[server]' \
    'basicConstraints = critical,CA:FALSE' \
    'keyUsage = critical,digitalSignature,keyEncipherment' \
    'extendedKeyUsage = serverAuth' \
    'subjectAltName = DNS:localhost,IP:127.0.0.1' \
    'authorityKeyIdentifier = keyid' \
    '[client]' \
    'basicConstraints = critical,CA:FALSE' \
    'keyUsage = critical,digitalSignature,keyEncipherment' \
    'extendedKeyUsage = clientAuth' \
    'authorityKeyIdentifier = keyid' >ext.cnf || return 1
  for ca in ca other-ca; do
    rmq_tls_key_csr "$ca" "orderd stack throwaway $ca" || return 1
    openssl x509 -req -in "$ca.csr" -signkey "$ca.key" -days 825 -sha256 \
      -extfile ext.cnf -extensions ca -out "$ca.crt" || return 1
  done
  rmq_tls_key_csr server localhost && rmq_tls_sign server ca server &&
    rmq_tls_key_csr client orderd-client && rmq_tls_sign client ca client &&
    rmq_tls_key_csr other-client orderd-other-client &&
    rmq_tls_sign other-client other-ca client || return 1
  # The other CA's key is never needed again; the stack CA's stays, to sign more.
  rm -f ./*.csr ./*.srl ext.cnf other-ca.key && chmod 600 ./*
}

# rmq_tls_key_csr NAME CN: NAME.key (EC P-256, not encrypted) and NAME.csr.
rmq_tls_key_csr() {
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/O=orderd stack/CN=$2"
}

# rmq_tls_sign NAME CA EXTENSIONS: NAME.crt from NAME.csr, signed by CA.crt and CA.key.
rmq_tls_sign() {
  openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial \
    -CAserial "$2.srl" -days 825 -sha256 -extfile ext.cnf -extensions "$3" -out "$1.crt"
}

# amqps_handshake: 0 when a TLS client that verifies the stack's CA and the name localhost
# completes a handshake on the amqps port.
amqps_handshake() {
  timeout 10 openssl s_client -connect "127.0.0.1:$STACK_AMQPS_PORT" -servername localhost \
    -CAfile "$RMQ_TLS_DIR/ca.crt" -verify_hostname localhost -verify_return_error \
    </dev/null >/dev/null 2>&1
}

rmq_start() {
  local pid running=""
  if pid=$(rmq_pid); then
    log "rabbitmq: already running (pid $pid)"
    running=1
  else
    [ -x "$RMQ_SBIN/rabbitmq-server" ] || die "rabbitmq: rabbitmq-server not found (run scripts/deps.sh)"
    local p
    for p in "$STACK_AMQP_PORT" "$STACK_AMQPS_PORT" "$STACK_RMQ_DIST_PORT"; do
      port_open "$p" && die "rabbitmq: 127.0.0.1:$p is in use by a process that is not this stack's"
    done
    mkdir -p "$RMQ_DIR/home" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
    rmq_tls_ensure
    chmod 700 "$RMQ_DIR/home"
    [ -f "$RMQ_DIR/enabled_plugins" ] || echo '[].' >"$RMQ_DIR/enabled_plugins"
    : >"$RMQ_DIR/rabbitmq-env.conf" # keeps /etc/rabbitmq/rabbitmq-env.conf out
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# Written by scripts/stack.sh at every start; edit the script, not this file.
listeners.tcp.default = 127.0.0.1:$STACK_AMQP_PORT
# amqps. A client is asked for a certificate, and one it sends must chain to ca.crt, but a
# client without one is let in (the TLS tests try both).
listeners.ssl.default = 127.0.0.1:$STACK_AMQPS_PORT
ssl_options.cacertfile = $RMQ_TLS_DIR/ca.crt
ssl_options.certfile = $RMQ_TLS_DIR/server.crt
ssl_options.keyfile = $RMQ_TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
log.console = false
log.file.level = info
EOF
    if [ ! -s "$RMQ_DIR/home/.erlang.cookie" ]; then
      (umask 077 && head -c 20 /dev/urandom | base32 -w0 | tr -d = >"$RMQ_DIR/home/.erlang.cookie")
      chmod 400 "$RMQ_DIR/home/.erlang.cookie"
    fi
    (rmq_env && epmd_start)
    rm -f "$RMQ_DIR/orderd.pid"
    log "rabbitmq: starting $STACK_RMQ_NODE on 127.0.0.1:$STACK_AMQP_PORT (amqps $STACK_AMQPS_PORT)"
    (rmq_env && cd / && exec setsid "$RMQ_SBIN/rabbitmq-server" \
      >>"$RMQ_DIR/log/startup.log" 2>&1 </dev/null 9>&-) &
    # The server's shell wrapper (it runs the VM as its child): what stop signals when the
    # VM has not written its pid file yet, e.g. start interrupted early.
    echo "$!" >"$RMQ_DIR/launcher.pid"
    if ! rmqctl wait --timeout "$START_TIMEOUT" "$RMQ_DIR/orderd.pid" >"$RMQ_DIR/log/wait.log" 2>&1; then
      tail_log "$RMQ_DIR/log/wait.log" "$RMQ_DIR/log/startup.log" "$RMQ_DIR/log/$STACK_RMQ_NODE.log"
      rmq_stop >/dev/null 2>&1 || true
      die "rabbitmq: did not start"
    fi
  fi
  if ! rmqctl -q status >/dev/null 2>&1; then
    tail_log "$RMQ_DIR/log/$STACK_RMQ_NODE.log"
    die "rabbitmq: not answering (rabbitmqctl status)"
  fi
  # guest may log in from loopback only, which is where we are; make sure it does.
  if ! amqp_login guest guest; then
    log "rabbitmq: guest cannot log in over 127.0.0.1; creating user orderd"
    rmqctl -q add_user orderd orderd >/dev/null 2>&1 || rmqctl -q change_password orderd orderd
    rmqctl -q set_permissions -p / orderd '.*' '.*' '.*'
    amqp_login orderd orderd || die "rabbitmq: neither guest nor orderd can log in"
    echo "amqp://orderd:orderd@127.0.0.1:$STACK_AMQP_PORT/" >"$RMQ_DIR/amqp-url"
  fi
  if ! amqps_handshake; then
    if [ -n "$running" ]; then
      # Started by an older stack.sh, before the TLS listener: say how to get one.
      log "rabbitmq: no TLS listener on 127.0.0.1:$STACK_AMQPS_PORT; to get one:" \
        "scripts/stack.sh stop rabbitmq && scripts/stack.sh start rabbitmq"
    else
      tail_log "$RMQ_DIR/log/$STACK_RMQ_NODE.log"
      die "rabbitmq: no verified TLS handshake on 127.0.0.1:$STACK_AMQPS_PORT"
    fi
  fi
}

rmq_stop() {
  local pid launcher
  launcher=$(pidfile_pid "$RMQ_DIR/launcher.pid" || true)
  if pid=$(rmq_pid); then
    log "rabbitmq: stopping (pid $pid)"
    if ! rmqctl -q stop "$RMQ_DIR/orderd.pid" >/dev/null 2>&1; then
      log "rabbitmq: rabbitmqctl stop failed; sending SIGTERM"
    fi
    terminate "$pid" beam.smp 30
  elif pid_is "$launcher" rabbitmq-server; then
    # Still booting, no pid file yet: the wrapper stops the VM on SIGTERM.
    log "rabbitmq: stopping a server still starting (pid $launcher)"
  else
    log "rabbitmq: not running"
  fi
  if pid_is "$launcher" rabbitmq-server; then
    local vm
    vm=$(pgrep -P "$launcher" -x beam.smp || true)
    terminate "$launcher" rabbitmq-server 30
    if [ -n "$vm" ]; then terminate "$vm" beam.smp 10; fi
  fi
  rm -f "$RMQ_DIR/launcher.pid"
  epmd_stop
}

rmq_status() {
  local pid
  if pid=$(rmq_pid) && port_open "$STACK_AMQP_PORT"; then
    local amqps="amqps 127.0.0.1:$STACK_AMQPS_PORT"
    port_open "$STACK_AMQPS_PORT" || amqps="amqps not listening (restart rabbitmq)"
    echo "rabbitmq: running (pid $pid) 127.0.0.1:$STACK_AMQP_PORT, $amqps, node $STACK_RMQ_NODE"
    return 0
  fi
  echo "rabbitmq: stopped"
  return 1
}

amqp_url() {
  if [ -s "$RMQ_DIR/amqp-url" ]; then cat "$RMQ_DIR/amqp-url"; else echo "$STACK_AMQP_URL"; fi
}

# ---- commands ------------------------------------------------------------------------
components() {
  local c
  if [ $# -eq 0 ]; then set -- "${STACK_COMPONENTS[@]}"; fi
  for c in "$@"; do
    case "$c" in
      pg | redis | rabbitmq) echo "$c" ;;
      *) die "unknown component '$c' (pg, redis, rabbitmq)" ;;
    esac
  done
}

fn_of() { case "$1" in pg) echo pg ;; redis) echo redis ;; rabbitmq) echo rmq ;; esac; }

lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  flock -w 120 9 || die "another scripts/stack.sh holds $STACK_DIR/.lock"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  start)
    list=$(components "$@")
    lock
    for c in $list; do "$(fn_of "$c")_start"; done
    log "stack: up (${list//$'\n'/ })"
    ;;
  stop)
    list=$(components "$@")
    lock
    # Reverse order: the message broker and cache first, the database last.
    for c in $(echo "$list" | tac); do "$(fn_of "$c")_stop"; done
    ;;
  status)
    list=$(components "$@")
    rc=0
    for c in $list; do "$(fn_of "$c")_status" || rc=1; done
    exit $rc
    ;;
  env)
    echo "export ORDERD_STACK_PG_DSN=\"$STACK_PG_DSN\""
    echo "export ORDERD_STACK_REDIS=$STACK_REDIS"
    echo "export ORDERD_STACK_AMQP_URL=$(amqp_url)"
    echo "export ORDERD_STACK_AMQPS_PORT=$STACK_AMQPS_PORT"
    echo "export ORDERD_STACK_AMQP_TLS_DIR=\"$RMQ_TLS_DIR\""
    ;;
  rabbitmqctl)
    # With the stack's node name, cookie and epmd port: a plain rabbitmqctl would look for
    # rabbit@<host> and start an epmd of its own on the default port, left running.
    rmq_pid >/dev/null || die "rabbitmq: not running (scripts/stack.sh start rabbitmq)"
    rmqctl "$@"
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
