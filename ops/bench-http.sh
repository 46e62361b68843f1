#!/usr/bin/env bash
# Durable HTTP appends with a keep-alive load generator: `wrk` posts appends of a `--payload`-byte
# `content` round-robin over `--conversations` conversations on `-c` connections (each connection
# has one request outstanding at a time, as HTTP/1.1 allows, and reuses its connection). Every
# answer counted is a `201 Created`: the append was fsynced before it was answered.
#
#   ops/bench-http.sh                      # wrk -t2 -c64 -d15s, 1,000 conversations, 200 bytes
#   FERRY_BENCH_CONNECTIONS=128 ops/bench-http.sh
#
# A fresh release node on a temp data dir (embedded SQLite archive, rate limits off) per run.
# Prints wrk's report, the server's CPU per acknowledged append (from /proc/PID/stat over the
# measured run) and the non-201 answers, if any. Environment: FERRY_BENCH_THREADS (default 2),
# FERRY_BENCH_CONNECTIONS (64), FERRY_BENCH_DURATION (s, 15), FERRY_BENCH_CONVERSATIONS (1000),
# FERRY_BENCH_PAYLOAD (bytes of `content`, 200), FERRY_BIN (the server binary; default the
# release build, built here).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads="${FERRY_BENCH_THREADS:-2}"
connections="${FERRY_BENCH_CONNECTIONS:-64}"
duration="${FERRY_BENCH_DURATION:-15}"
conversations="${FERRY_BENCH_CONVERSATIONS:-1000}"
payload="${FERRY_BENCH_PAYLOAD:-200}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
key="bench-http-$(date +%s)-$$-key"

log() { printf '[bench-http] %s\n' "$*" >&2; }

command -v wrk >/dev/null || {
  log "wrk is missing (apt-get install wrk)"
  exit 1
}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release --locked -p ferry >&2
fi
ferry="${FERRY_BIN:-$target_dir/release/ferry}"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

work="$(mktemp -d -t ferry-bench-http-XXXXXX)"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port="$(free_port)"
admin="$(free_port)"
env FERRY_BOOTSTRAP_API_KEY="$key" FERRY_RATE__APPENDS=0 FERRY_RATE__CONNECTS_PER_IP=0 \
  FERRY_RATE__AUTH_FAILURES_PER_IP=0 FERRY_RATE__EPHEMERAL=0 \
  "$ferry" serve --data-dir "$work/data" --listen "127.0.0.1:$port" \
  --admin-listen "127.0.0.1:$admin" >"$work/server.log" 2>&1 &
server_pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
  curl -sf "$base/readyz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || {
    cat "$work/server.log" >&2
    exit 1
  }
  sleep 0.1
done

log "creating $conversations conversations"
seq 0 $((conversations - 1)) | xargs -P 8 -I{} curl -sf -o /dev/null -X PUT \
  -H "Authorization: Bearer $key" -d '{"participants":["loadtest"]}' \
  "$base/v1/conversations/h-{}"

text="$(head -c "$payload" /dev/zero | tr '\0' 'x')"
cat >"$work/append.lua" <<EOF
-- Each thread walks the conversations from its own offset; every request is a durable append.
local n = $conversations
local i = 0
local body = '{"sender":"loadtest","content":{"text":"$text"}}'
local headers = { ["Authorization"] = "Bearer $key", ["Content-Type"] = "application/json" }
local statuses = {}
setup = function(thread) thread:set("offset", math.random(0, n - 1)) end
init = function() i = offset or 0 end
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/conversations/h-" .. (i % n) .. "/messages", headers, body)
end
response = function(status)
  if status ~= 201 then statuses[status] = (statuses[status] or 0) + 1 end
end
done = function(summary)
  local errors = summary.errors
  io.write(string.format("non-2xx or failed: status %d, connect %d, read %d, write %d, timeout %d\n",
    errors.status, errors.connect, errors.read, errors.write, errors.timeout))
end
EOF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$server_pid/stat"; }
# A short warm-up: every conversation's actor started, caches filled.
wrk -t "$threads" -c "$connections" -d 3s -s "$work/append.lua" "$base" >/dev/null
before="$(cpu_ticks)"
# `times` in the subshell: the CPU wrk itself used (it shares the machine with the server).
(
  wrk -t "$threads" -c "$connections" -d "${duration}s" --latency -s "$work/append.lua" "$base" \
    >"$work/wrk.txt"
  times >"$work/times.txt"
)
after="$(cpu_ticks)"
cat "$work/wrk.txt"
hz="$(getconf CLK_TCK)"
python3 - "$work/wrk.txt" "$before" "$after" "$hz" "$work/times.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
before, after, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# The second line of `times`: children's user and system time, as 0m1.234s 0m0.567s.
child = open(sys.argv[5]).read().split("\n")[1].split()
wrk_cpu = sum(int(m) * 60 + float(s) for m, s in (re.match(r"(\d+)m([\d.]+)s", t).groups() for t in child))
m = re.search(r"(\d+) requests in ([\d.]+)s", text)
requests, seconds = int(m.group(1)), float(m.group(2))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
acked = requests - (int(bad.group(1)) if bad else 0)
cpu = (after - before) / hz
print(f"acknowledged appends/s: {acked / seconds:,.0f}   server cores: {cpu / seconds:.2f}   "
      f"wrk cores: {wrk_cpu / seconds:.2f}   "
      f"server CPU per acknowledged append: {cpu / acked * 1e6:.1f} us")
PY
