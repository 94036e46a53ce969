#!/usr/bin/env bash
# External checks: the broker and the mock region from outside, as an integrator would see them.
#
#   tests/external/run.sh [BIN_DIR]
#
# BIN_DIR holds the `carerecord` and `mock-sources` binaries (default: $CARERECORD_BIN_DIR, else
# target/debug). Build them first, e.g. `cargo build --bin carerecord --bin mock-sources`.
#
# Creates a Python venv (tests/external/.venv, or $EXT_VENV) with the pinned packages from
# requirements.txt, starts `mock-sources serve` and a plaintext `carerecord serve` on free
# loopback ports, then runs:
#   check_grpc.py     stubs generated from the .proto by grpcio-tools; health, reflection,
#                     GetCareRecord / StreamCareRecord, status codes, deadlines, lookup --json
#   validate_fhir.py  every FHIR resource and Bundle the mock region serves, against
#                     fhir.resources (R4B models) plus the UK Core shapes the broker relies on
#   check_tls.py      a second broker with mutual TLS (certificates made with `cryptography`)
#   check_fhir_face.py the broker's FHIR R4 face (`[fhir]` on another loopback port; its
#                     `unverified_token_key` made with `carerecord token new-key`) as an outside
#                     FHIR client: tokens signed in Python, read with fhir.resources and fhirclient
#   check_python_source.py the Python example source (examples/python-source) behind its own
#                     broker over [sources.grpc]: served, not known, slow, failing, wrong
#                     patient, garbage; and `carerecord conformance --grpc` against it
# and prints `N passed, M failed`. Exits non-zero on any failure. Everything started is stopped
# on exit. Set EXT_KEEP_TMP=1 to keep the temp dir (configs, logs, audit trail); EXT_ONLY="a.py b.py"
# runs only those scripts.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN_DIR="${1:-${CARERECORD_BIN_DIR:-$ROOT/target/debug}}"
if [[ ! -x "$BIN_DIR/carerecord" || ! -x "$BIN_DIR/mock-sources" ]]; then
  echo "run.sh: $BIN_DIR must contain the carerecord and mock-sources binaries" >&2
  echo "        (cargo build --bin carerecord --bin mock-sources)" >&2
  exit 2
fi
BIN_DIR="$(cd "$BIN_DIR" && pwd)"
PATIENTS=500
ORGS=8

TMP="$(mktemp -d "${TMPDIR:-/tmp}/carerecord-ext.XXXXXX")"
PIDS_FILE="$TMP/pids" # every process started, one pid a line (check_tls.py appends its broker)
: >"$PIDS_FILE"
RESULTS="$TMP/results"
: >"$RESULTS"
STATUS=1

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -s "$PIDS_FILE" ]]; then
    while read -r pid; do
      [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    done <"$PIDS_FILE"
    # Give them a moment to stop, then insist.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      local alive=0
      while read -r pid; do
        [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && alive=1
      done <"$PIDS_FILE"
      [[ $alive == 0 ]] && break
      sleep 0.2
    done
    while read -r pid; do
      [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null || true
    done <"$PIDS_FILE"
  fi
  if [[ $STATUS != 0 ]]; then
    for log in mock.err broker.log tls/broker.log; do
      if [[ -s "$TMP/$log" ]]; then
        echo "---- last lines of $log ----" >&2
        tail -n 25 "$TMP/$log" | sed 's/\x1b\[[0-9;]*m//g' >&2
      fi
    done
  fi
  if [[ "${EXT_KEEP_TMP:-0}" == 1 ]]; then
    echo "run.sh: kept $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "run.sh: $*" >&2; }
die() {
  log "$*"
  echo "0 passed, 1 failed"
  exit 1
}

# ---- Python venv ------------------------------------------------------------------------
VENV="${EXT_VENV:-$HERE/.venv}"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  log "creating venv $VENV"
  rm -rf "$VENV"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
  echo "$want" >"$STAMP"
fi
PY="$VENV/bin/python"

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---- the mock region --------------------------------------------------------------------
BROKER_PORT="$(free_port)"
"$BIN_DIR/mock-sources" serve --patients "$PATIENTS" --organisations "$ORGS" \
  --write-broker-config "$TMP/broker.toml" --broker-listen "127.0.0.1:$BROKER_PORT" \
  >"$TMP/mock.out" 2>"$TMP/mock.err" &
MOCK_PID=$!
echo "$MOCK_PID" >>"$PIDS_FILE"

ADMIN_URL=""
for _ in $(seq 1 300); do
  kill -0 "$MOCK_PID" 2>/dev/null || die "mock-sources exited early: $(tail -n 5 "$TMP/mock.err")"
  ADMIN_URL="$(awk '$1 == "admin" { print $2 }' "$TMP/mock.out")"
  if [[ -n "$ADMIN_URL" ]] && grep -q "broker config written" "$TMP/mock.err" &&
    "$PY" -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1]+"/organisations", timeout=2)' \
      "$ADMIN_URL" 2>/dev/null; then
    break
  fi
  ADMIN_URL=""
  sleep 0.1
done
[[ -n "$ADMIN_URL" ]] || die "mock-sources admin did not answer within 30 s"
log "mock region up; admin $ADMIN_URL"

# ---- the FHIR face: [fhir] on its own loopback port; `unverified` callers' tokens verified with
# a key made by the product's CLI (check_fhir_face.py signs with its private half, in Python) ----
mkdir -p "$TMP/fhir"
"$BIN_DIR/carerecord" token new-key --out "$TMP/fhir/token-key.der" >"$TMP/fhir/token-key.pub.pem" ||
  die "carerecord token new-key failed"
FHIR_PORT="$(free_port)"
cat >>"$TMP/broker.toml" <<EOF

# Added by run.sh: the FHIR R4 face, plaintext on loopback (base URL and audience by default).
[fhir]
listen = "127.0.0.1:$FHIR_PORT"
unverified_token_key = "$TMP/fhir/token-key.pub.pem"
EOF

# ---- the broker (plaintext, CWD=$TMP so the default audit file lands there) ---------------
wait_serving() { # addr pid log -> 0 when the health check says SERVING
  "$PY" - "$1" "$2" <<'EOF'
import os, sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
addr, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(3)
    try:
        with grpc.insecure_channel(addr) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="carerecord.v1.CareRecordService"), timeout=1)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
    except grpc.RpcError:
        pass
    time.sleep(0.1)
sys.exit(4)
EOF
}

BROKER_ADDR=""
for attempt in 1 2 3; do
  addr="127.0.0.1:$BROKER_PORT"
  (cd "$TMP" && exec "$BIN_DIR/carerecord" serve --config "$TMP/broker.toml") >"$TMP/broker.log" 2>&1 &
  BROKER_PID=$!
  echo "$BROKER_PID" >>"$PIDS_FILE"
  if wait_serving "$addr" "$BROKER_PID"; then
    BROKER_ADDR="$addr"
    break
  fi
  kill "$BROKER_PID" 2>/dev/null || true
  if grep -q "cannot listen" "$TMP/broker.log"; then
    # Lost the port race: take another and try again.
    BROKER_PORT="$(free_port)"
    FHIR_PORT="$(free_port)"
    sed -i -e "/^\[server\]/,/^\[/ s/^listen = .*/listen = \"127.0.0.1:$BROKER_PORT\"/" \
      -e "/^\[fhir\]/,/^\[/ s/^listen = .*/listen = \"127.0.0.1:$FHIR_PORT\"/" "$TMP/broker.toml"
    log "broker or FHIR port taken; retrying on $BROKER_PORT and $FHIR_PORT"
    continue
  fi
  die "broker did not become SERVING (attempt $attempt): $(tail -n 5 "$TMP/broker.log")"
done
[[ -n "$BROKER_ADDR" ]] || die "broker could not get a port"
log "broker SERVING on $BROKER_ADDR; FHIR face on http://127.0.0.1:$FHIR_PORT/"

# ---- the checks -------------------------------------------------------------------------
export EXT_ROOT="$ROOT" EXT_BIN_DIR="$BIN_DIR" EXT_TMP="$TMP" EXT_RESULTS="$RESULTS"
export EXT_BROKER_ADDR="$BROKER_ADDR" EXT_BROKER_CONFIG="$TMP/broker.toml"
export EXT_ADMIN_URL="$ADMIN_URL" EXT_PATIENTS="$PATIENTS" EXT_ORGS="$ORGS"
export EXT_PIDS_FILE="$PIDS_FILE" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export EXT_FHIR_BASE="http://127.0.0.1:$FHIR_PORT/" EXT_FHIR_TOKEN_KEY="$TMP/fhir/token-key.der"
# gRPC core's own log lines (e.g. the TLS handshake failures the TLS checks provoke) are noise.
export GRPC_VERBOSITY="${GRPC_VERBOSITY:-NONE}"

# EXT_ONLY="check_fhir_face.py ..." runs just those (while working on one of them).
read -r -a SCRIPTS <<<"${EXT_ONLY:-check_grpc.py validate_fhir.py check_tls.py check_fhir_face.py check_python_source.py}"
for script in "${SCRIPTS[@]}"; do
  echo "==== $script"
  before="$(wc -l <"$RESULTS")"
  rc=0
  # In the background and waited for, so a signal to run.sh is handled at once (bash defers
  # traps while a foreground child runs).
  timeout 300 "$PY" "$HERE/$script" &
  child=$!
  echo "$child" >>"$PIDS_FILE"
  wait "$child" || rc=$?
  after="$(wc -l <"$RESULTS")"
  if [[ "$after" == "$before" ]]; then
    echo "FAIL [$script] crashed or timed out (exit $rc) before reporting"
    echo "0 1" >>"$RESULTS"
  elif [[ $rc != 0 ]] && [[ "$(tail -n 1 "$RESULTS" | cut -d' ' -f2)" == 0 ]]; then
    echo "FAIL [$script] exited $rc after reporting no failures"
    echo "0 1" >>"$RESULTS"
  fi
done

# The broker must still be up after all that.
if kill -0 "$BROKER_PID" 2>/dev/null && kill -0 "$MOCK_PID" 2>/dev/null; then
  echo "PASS [run.sh] broker and mock-sources still running after the checks"
  echo "1 0" >>"$RESULTS"
else
  echo "FAIL [run.sh] broker or mock-sources died during the checks"
  echo "0 1" >>"$RESULTS"
fi

read -r passed failed < <(awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }' "$RESULTS")
[[ "$failed" == 0 ]] && STATUS=0
echo "$passed passed, $failed failed"
exit "$STATUS"
