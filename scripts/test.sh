#!/usr/bin/env bash
# The README's test command, and all that CI runs (.ci/run). From a fresh machine:
# installs what is missing, builds build/ (-Werror) and build-asan/ (ASan+UBSan, -Werror),
# starts the private local stack, recreates the test databases, runs every ctest test in
# both trees and then the end-to-end suite (tests/e2e, pytest) against the ASan binary.
#
# Every stage runs even when an earlier one failed (a tree that did not build is not
# tested). The stack is stopped at the end, also on failure or Ctrl-C, unless it was
# already running before (then it is left running). The last line is always
#   total: N passed, M failed
# and the exit status is non-zero when a test or a stage failed.
# shellcheck disable=SC2317 # functions run through `stage` and traps
set -uo pipefail # no -e: a failing stage is recorded, and the next one runs
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ORDERD_ROOT" || exit 1

T0=$SECONDS
LOGDIR="$ORDERD_LOCAL/test-logs"
mkdir -p "$LOGDIR"

PASSED=0
FAILED=0
STAGES=()       # "name: result (Ns)" for the summary
STAGE_FAILED=0  # a stage (build, stack, ...) failed
STACK_STARTED=""
STACK_CHECKED=0
TOTAL_PRINTED=0

# stage NAME CMD...: runs CMD as one logged stage; returns its status.
stage() {
  local name=$1 rc
  shift
  stage_begin "$name"
  "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then stage_end ok; else stage_end "FAILED (status $rc)"; STAGE_FAILED=1; fi
  STAGES+=("$(printf '%-42s %s (%ds)' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" "$STAGE_ELAPSED")")
  return "$rc"
}

skip() {
  printf '\n==> %s\n<== %s: skipped (%s)\n' "$1" "$1" "$2" >&2
  STAGES+=("$(printf '%-42s skipped: %s' "$1" "$2")")
  STAGE_FAILED=1
}

finish() {
  local rc=$?
  trap '' INT TERM HUP
  [ "$TOTAL_PRINTED" = 1 ] && exit "$rc"
  TOTAL_PRINTED=1
  if [ -n "$STACK_STARTED" ]; then
    # shellcheck disable=SC2086 # a list of component names
    stage "stop local stack ($STACK_STARTED)" bash scripts/stack.sh stop $STACK_STARTED
  elif [ "$STACK_CHECKED" = 1 ]; then
    log "test: the local stack was running before; left running (scripts/stack.sh stop)"
  fi
  printf '\n==> summary (%ds, logs in .local/test-logs/)\n' "$((SECONDS - T0))"
  printf '  %s\n' "${STAGES[@]}"
  if [ "$rc" -ne 0 ] || [ "$STAGE_FAILED" = 1 ] || [ "$FAILED" -gt 0 ]; then rc=1; fi
  printf 'total: %d passed, %d failed\n' "$PASSED" "$FAILED"
  exit "$rc"
}
trap finish EXIT
trap 'log "test: interrupted"; exit 130' INT
trap 'log "test: terminated"; exit 143' TERM HUP

# ---- stages ------------------------------------------------------------------------
build_tree() {
  local dir=$1
  shift
  cmake -S . -B "$dir" "$@" && cmake --build "$dir" -j2
}

# run_ctest DIR: ctest in DIR; adds its counts to PASSED/FAILED.
run_ctest() {
  local dir=$1 log rc line n_failed n_total
  log="$LOGDIR/ctest-$(basename "$dir").log"
  # --timeout: one hung test must not eat the CI budget.
  ctest --test-dir "$dir" --output-on-failure --timeout 300 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  line=$(grep -Eo '[0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    n_failed=$(echo "$line" | awk '{print $1}')
    n_total=$(echo "$line" | awk '{print $NF}')
    PASSED=$((PASSED + n_total - n_failed))
    FAILED=$((FAILED + n_failed))
    log "test: ctest $dir: $((n_total - n_failed)) passed, $n_failed failed"
  elif grep -q 'No tests were found' "$log"; then
    log "test: ctest $dir: no tests registered"
  elif [ "$rc" -eq 0 ]; then
    log "test: ctest $dir: could not read its summary"
    rc=1
  fi
  return "$rc"
}

# run_pytest NAME LIMIT_S ARGS...: a pytest run; adds its counts to PASSED/FAILED.
run_pytest() {
  local name=$1 limit=$2 log rc summary n
  shift 2
  log="$LOGDIR/$name.log"
  timeout --foreground -k 30 "$limit" \
    /usr/bin/python3 -m pytest "$@" -v -p no:cacheprovider 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 5 ]; then
    log "test: $name: pytest collected no tests (exit status 5): the suite is missing"
    FAILED=$((FAILED + 1))
    return 1
  fi
  # The last line, e.g. "==== 12 passed, 1 failed, 2 errors in 9.1s ====" (colours off).
  summary=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^=+ .* in [0-9.]+s' | tail -n 1)
  n=$(echo "$summary" | grep -Eo '[0-9]+ passed' | awk '{print $1}')
  PASSED=$((PASSED + ${n:-0}))
  n=$(echo "$summary" | grep -Eo '[0-9]+ failed' | awk '{print $1}')
  FAILED=$((FAILED + ${n:-0}))
  n=$(echo "$summary" | grep -Eo '[0-9]+ errors?' | awk '{print $1}')
  FAILED=$((FAILED + ${n:-0}))
  if [ "$rc" -eq 124 ]; then log "test: $name: timed out"; fi
  return "$rc"
}

# run_e2e: the end-to-end suite against the ASan binary.
run_e2e() {
  ORDERD_BIN="$PWD/build-asan/orderd" \
    ORDERD_E2E_PG_DSN="host=127.0.0.1 port=$STACK_PG_PORT dbname=orderd_e2e user=orderd" \
    ORDERD_E2E_AMQP="127.0.0.1:$STACK_AMQP_PORT" \
    ORDERD_REPO="$PWD" \
    run_pytest e2e 1500 tests/e2e
}

# run_valgrind: the unit and server tests (no database, no network) under valgrind, on the
# plain build: a second opinion to ASan, with full leak checking. One test per program.
run_valgrind() {
  local t rc=0 log="$LOGDIR/valgrind.log"
  : >"$log"
  for t in build/tests/unit/test_* build/tests/server/test_*; do
    [ -x "$t" ] || continue
    if valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
      "$t" >>"$log" 2>&1; then
      PASSED=$((PASSED + 1))
      log "test: valgrind $t: ok"
    else
      FAILED=$((FAILED + 1))
      rc=1
      log "test: valgrind $t: FAILED (see $log)"
    fi
  done
  return "$rc"
}

# check_format: every C file we wrote is as the committed .clang-format wants it.
check_format() {
  local files
  files=$(git ls-files '*.c' '*.h' 2>/dev/null) || files=$(find . -path ./build\* -prune -o \( -name '*.c' -o -name '*.h' \) -print)
  # shellcheck disable=SC2086 # a list of file names without spaces
  clang-format --dry-run --Werror $files
}

recreate_test_databases() {
  local db bin
  bin=$(pg_bindir) || return 1
  for db in orderd_test orderd_e2e; do
    PGOPTIONS="-c client_min_messages=warning" "$bin/dropdb" "${STACK_PG_ARGS[@]}" --if-exists --force "$db" &&
      "$bin/createdb" "${STACK_PG_ARGS[@]}" -O orderd "$db" || return 1
  done
}

start_stack() {
  STACK_STARTED=$(stack_components_down)
  STACK_CHECKED=1
  bash scripts/stack.sh start
}

# ---- the run -----------------------------------------------------------------------
stage "dependencies (scripts/deps.sh)" bash scripts/deps.sh

build_ok=0
asan_ok=0
stage "build build/ (-Werror)" build_tree build -DORDERD_WERROR=ON && build_ok=1
stage "build build-asan/ (ASan+UBSan, -Werror)" build_tree build-asan \
  -DORDERD_SANITIZE=ON -DORDERD_WERROR=ON -DCMAKE_BUILD_TYPE=Debug && asan_ok=1

stack_ok=0
stage "start local stack" start_stack && stack_ok=1
stage "development secrets" ensure_dev_secrets
if [ "$stack_ok" = 1 ]; then
  stage "recreate orderd_test, orderd_e2e" recreate_test_databases
else
  skip "recreate orderd_test, orderd_e2e" "no stack"
fi

export ORDERD_TEST_PG_DSN="host=127.0.0.1 port=$STACK_PG_PORT dbname=orderd_test user=orderd"
export ORDERD_TEST_REDIS="$STACK_REDIS"
STACK_ENV=$(bash scripts/stack.sh env)
ORDERD_TEST_AMQP_URL=$(echo "$STACK_ENV" | sed -n 's/^export ORDERD_STACK_AMQP_URL=//p')
export ORDERD_TEST_AMQP_URL="${ORDERD_TEST_AMQP_URL:-$STACK_AMQP_URL}"
# amqps and its throwaway certificates (tests/amqp/test_tls.c), as stack.sh made them.
ORDERD_TEST_AMQPS_PORT=$(echo "$STACK_ENV" | sed -n 's/^export ORDERD_STACK_AMQPS_PORT=//p')
ORDERD_TEST_AMQP_TLS_DIR=$(echo "$STACK_ENV" | sed -n 's/^export ORDERD_STACK_AMQP_TLS_DIR="\(.*\)"$/\1/p')
export ORDERD_TEST_AMQPS_PORT ORDERD_TEST_AMQP_TLS_DIR
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ -f tests/lsan.supp ]; then
  export LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp:print_suppressions=0"
fi

if [ "$build_ok" = 1 ]; then
  stage "ctest build/" run_ctest build
else
  skip "ctest build/" "build failed"
fi
if [ "$asan_ok" = 1 ]; then
  stage "ctest build-asan/" run_ctest build-asan
else
  skip "ctest build-asan/" "build failed"
fi
stage "format (clang-format --dry-run)" check_format
if [ "$build_ok" = 1 ]; then
  stage "valgrind (unit and server tests)" run_valgrind
else
  skip "valgrind (unit and server tests)" "build failed"
fi
stage "provider fakes (pytest tests/fakes)" run_pytest fakes 300 tests/fakes
if [ "$asan_ok" = 1 ]; then
  stage "end-to-end (pytest tests/e2e)" run_e2e
else
  skip "end-to-end (pytest tests/e2e)" "build-asan failed"
fi
exit 0 # finish (the EXIT trap) decides the status
