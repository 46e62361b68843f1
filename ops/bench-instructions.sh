#!/usr/bin/env bash
# Instructions the server executes per acknowledged append, counted by callgrind: a figure that
# does not move with the machine's noise, for comparing one change against the one before it.
#
#   ops/bench-instructions.sh            # WebSocket and HTTP appends
#   ops/bench-instructions.sh ws         # one transport
#   ops/bench-instructions.sh ws -- --connections 1   # extra load-tool flags after --
#
# The server runs under `valgrind --tool=callgrind` with instrumentation off while it starts; the load
# tool's first (warm-up) run creates the conversations and fills the caches, then instrumentation
# is switched on for the measured run only. What is counted: user-space instructions of every server
# thread (tokio workers, the WAL writer, the archiver and SQLite), not the kernel's work behind
# system calls (fsync, socket writes). Callgrind runs the threads one at a time, so the rate is
# low on purpose; batching at this rate is what a lightly loaded node sees.
#
# Environment: FERRY_INSTR_RATE (appends/s, default 500), FERRY_INSTR_DURATION (s, default 20),
# FERRY_INSTR_CONVERSATIONS (default 100), FERRY_INSTR_PAYLOAD (bytes, default 200),
# FERRY_INSTR_OUT (where the callgrind files go, default a temp dir that is kept and printed).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
which=(ws http)
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
  which=("$1")
  shift
fi
[ "${1:-}" = "--" ] && shift
extra=("$@")
rate="${FERRY_INSTR_RATE:-500}"
duration="${FERRY_INSTR_DURATION:-20}"
conversations="${FERRY_INSTR_CONVERSATIONS:-100}"
payload="${FERRY_INSTR_PAYLOAD:-200}"
out="${FERRY_INSTR_OUT:-$(mktemp -d -t ferry-instr-XXXXXX)}"
mkdir -p "$out"
key="instr-$(date +%s)-$$-key"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
ferry="$target_dir/release/ferry"
loadtest="$target_dir/release/ferry-loadtest"

log() { printf '[instr] %s\n' "$*" >&2; }

command -v valgrind >/dev/null || {
  log "valgrind is missing (apt-get install valgrind)"
  exit 1
}
cargo build --release --locked -p ferry -p ferry-loadtest >&2

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "port $1 never opened"
  return 1
}

server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT

measure() {
  local transport="$1"
  local dir="$out/$transport"
  rm -rf "$dir"
  mkdir -p "$dir/data"
  local port admin
  port="$(free_port)"
  admin="$(free_port)"
  env FERRY_BOOTSTRAP_API_KEY="$key" FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 \
    FERRY_RATE__APPENDS=0 FERRY_RATE__CONNECTS_PER_IP=0 FERRY_RATE__AUTH_FAILURES_PER_IP=0 \
    FERRY_RATE__EPHEMERAL=0 \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out" \
    "$ferry" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" \
    --admin-listen "127.0.0.1:$admin" >"$dir/stdout.log" 2>"$dir/stderr.log" &
  server_pid=$!
  wait_port "$port"
  local common=(append --target "http://127.0.0.1:$port" --api-key "$key" --transport "$transport"
    --conversations "$conversations" --payload "$payload" --prefix "instr-$transport" --no-progress)
  log "$transport: warm-up"
  "$loadtest" "${common[@]}" --rate "$rate" --duration 3 "${extra[@]}" >/dev/null
  callgrind_control --instr=on "$server_pid" >/dev/null
  log "$transport: measuring $rate/s for ${duration}s"
  "$loadtest" "${common[@]}" --rate "$rate" --duration "$duration" --json "$dir/report.json" \
    "${extra[@]}" >"$dir/loadtest.log"
  callgrind_control --instr=off "$server_pid" >/dev/null
  kill -TERM "$server_pid"
  wait "$server_pid" || true
  server_pid=""
  local ir acked
  ir="$(sed -n 's/^==[0-9]*== Collected : \([0-9]*\)$/\1/p' "$dir/stderr.log")"
  acked="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["ok"])' "$dir/report.json")"
  python3 - "$transport" "$ir" "$acked" <<'EOF'
import sys
transport, ir, acked = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(f"{transport}: {ir:,} instructions / {acked:,} acked appends = {ir / max(acked, 1):,.0f} per append")
EOF
}

for transport in "${which[@]}"; do
  measure "$transport"
done
log "callgrind files in $out (callgrind_annotate $out/<transport>/callgrind.out)"
