#!/usr/bin/env bash
# Installs the Debian packages orderd needs to build, run and test; skips what is present.
#
# Installing postgresql, redis-server or rabbitmq-server on Debian normally creates and
# starts a default server on the default port. We never want that (a developer's own
# servers are never touched, and CI must not leave daemons behind), so for the duration of
# the install a policy-rc.d forbids service starts and PostgreSQL's default cluster
# creation is switched off. The private stack is started by scripts/stack.sh instead.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git
  libgrpc-dev protobuf-compiler libprotobuf-dev protobuf-c-compiler libprotobuf-c-dev
  libpq-dev libhiredis-dev librabbitmq-dev libcurl4-openssl-dev libssl-dev
  libyaml-dev libjansson-dev libmicrohttpd-dev libcmocka-dev
  postgresql postgresql-client redis-server redis-tools rabbitmq-server
  python3 python3-grpcio python3-protobuf python3-pika python3-pytest
  procps psmisc valgrind clang-format openssl
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

echo "deps: installing ${missing[*]}" >&2

# Forbid service starts during the install, unless the machine already forbids them.
policy_added=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  policy_added=1
fi
cleanup() {
  if [ "$policy_added" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

# No default PostgreSQL cluster on port 5432.
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo 'create_main_cluster = false' | $SUDO tee /etc/postgresql-common/createcluster.d/orderd-no-main.conf >/dev/null

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
