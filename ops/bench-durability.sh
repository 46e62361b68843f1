#!/usr/bin/env bash
# `cluster.durability = "local"` against `"archive"` on one clustered node, in one run: durable
# WebSocket appends/s and ack latency at each offered rate.
#
#   ops/bench-durability.sh
#   FERRY_BENCH_RATES="5000" FERRY_BENCH_DURATION=5 ops/bench-durability.sh   # a quick one
#
# For each durability, in turn: a fresh Postgres database (FERRY_BENCH_POSTGRES, trust auth), a
# private `redis-server`, and one `ferry serve` with a cluster secret (so the node is a cluster
# member: fenced archive writes, a lease), started with `FERRY_CLUSTER__DURABILITY=<mode>` and
# waited on until it owns every slot; then, for each rate of FERRY_BENCH_RATES (default
# "5000 20000"), `ferry-loadtest append --transport ws --rate R --duration D --conversations 64
# --connections 6 --payload 200`, and the number of archive transactions the node committed
# meanwhile (`ferry_archive_batch_seconds_count`). Reports (JSON and text per run, the node's
# log, summary.txt) go to FERRY_BENCH_OUT (default: a new directory under $TMPDIR).
# Builds the release binaries first (honours CARGO_TARGET_DIR). Exit status 0 when every run
# passed the load tool's checks.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rates="${FERRY_BENCH_RATES:-5000 20000}"
duration="${FERRY_BENCH_DURATION:-10}"
postgres="${FERRY_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="${FERRY_BENCH_OUT:-$(mktemp -d -t ferry-bench-durability-XXXXXX)}"
work="$(mktemp -d -t ferry-bench-durability-work-XXXXXX)"
key=bench-admin-key-0001
# One key drives the whole load (and a load tool socket joins hundreds of conversations): the
# [rate] limits and max_topics_per_socket would refuse most of it (FERRY_BENCH_RATE_LIMITS=on
# keeps them on, with ceilings no run reaches, to measure what checking them costs).
if [ "${FERRY_BENCH_RATE_LIMITS:-off}" = on ]; then
  rate_env=(FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 FERRY_RATE__APPENDS=100000000/s FERRY_RATE__CONNECTS_PER_IP=100000000/s FERRY_RATE__AUTH_FAILURES_PER_IP=100000000/s FERRY_RATE__EPHEMERAL=100000000/s)
else
  rate_env=(FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 FERRY_RATE__APPENDS=0 FERRY_RATE__CONNECTS_PER_IP=0 FERRY_RATE__AUTH_FAILURES_PER_IP=0 FERRY_RATE__EPHEMERAL=0)
fi
node_pid=""
redis_pid=""
db=""

log() { printf '[bench-durability] %s\n' "$*" >&2; }

drop_db() {
  [ -n "$db" ] && psql -q "$postgres/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
    >/dev/null 2>&1
  db=""
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [ -n "$node_pid" ] && kill -KILL "$node_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  drop_db || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in cargo psql redis-server curl jq python3; do
  command -v "$tool" >/dev/null || {
    log "$tool is required"
    exit 1
  }
done

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# until_ok WHAT CMD...: runs CMD every 100 ms until it succeeds, for at most 60 s.
until_ok() {
  local what="$1" i
  shift
  for i in $(seq 1 600); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "timed out waiting for $what"
  return 1
}

# owns_every_slot: the node is active and owns every slot, none moving.
owns_every_slot() {
  local status
  status="$(curl -sf -H "authorization: Bearer $key" "http://127.0.0.1:$admin/admin/cluster")" ||
    return 1
  jq -e '.unassigned_slots == 0 and .moving_slots == 0 and .nodes[0].state == "active"' \
    >/dev/null <<<"$status"
}

archive_batches() {
  curl -sf "http://127.0.0.1:$admin/metrics" |
    awk '/^ferry_archive_batch_seconds_count/ { n += $NF } END { printf "%d", n }'
}

mkdir -p "$out"
log "reports go to $out"
cargo build --release --locked -p ferry -p ferry-loadtest >&2
mkdir -p "$work/bin"
cp "$target_dir/release/ferry" "$target_dir/release/ferry-loadtest" "$work/bin/"

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" --save "" --appendonly no \
  >"$out/redis.log" 2>&1 &
redis_pid=$!
until_ok "redis" redis-cli -p "$redis_port" ping

status=0
printf 'durability\trate\tacked\tscheduled\tskipped\ttry_again\tp50_ms\tp90_ms\tp99_ms\tmax_ms\tarchive_tx\n' \
  >"$out/summary.tsv"
for mode in local archive; do
  db="ferry_bench_durability_${mode}_$$"
  psql -q "$postgres/postgres" -c "CREATE DATABASE $db" >/dev/null
  listen="$(free_port)"
  admin="$(free_port)"
  env FERRY_BOOTSTRAP_API_KEY="$key" FERRY_LIMITS__SOCKET_IN_FLIGHT=1024 "${rate_env[@]}" \
    FERRY_CLUSTER__DURABILITY="$mode" \
    "$work/bin/ferry" serve --node-id n1 --data-dir "$work/$mode" \
    --listen "127.0.0.1:$listen" --admin-listen "127.0.0.1:$admin" \
    --database-url "$postgres/$db" --redis-url "redis://127.0.0.1:$redis_port" \
    --cluster-secret s3 >"$out/node-$mode.log" 2>&1 &
  node_pid=$!
  until_ok "n1 ($mode) to own every slot" owns_every_slot
  for rate in $rates; do
    log "$mode at $rate/s for ${duration}s"
    before="$(archive_batches)"
    "$work/bin/ferry-loadtest" append --api-key "$key" --target "http://127.0.0.1:$listen" \
      --transport ws --rate "$rate" --duration "$duration" --conversations 64 --connections 6 \
      --payload 200 --no-progress --label "$mode $rate/s" --json "$out/$mode-$rate.json" \
      >"$out/$mode-$rate.txt" 2>&1 || status=1
    after="$(archive_batches)"
    jq -r --arg mode "$mode" --arg rate "$rate" --arg tx "$((after - before))" '
      def r: (. * 100 | round) / 100;
      [$mode, $rate, .ok, .scheduled, .skipped, .try_again, (.ack_latency.p50_ms | r),
       (.ack_latency.p90_ms | r), (.ack_latency.p99_ms | r), (.ack_latency.max_ms | r), $tx]
      | @tsv' "$out/$mode-$rate.json" >>"$out/summary.tsv"
  done
  kill -TERM "$node_pid"
  wait "$node_pid" || true
  node_pid=""
  drop_db
done

{
  echo "cluster.durability on one clustered node ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "load: ferry-loadtest append --transport ws, 64 conversations, 6 connections, 200-byte payloads, ${duration}s per rate"
  column -t -s $'\t' "$out/summary.tsv"
  echo "reports: $out"
} | tee "$out/summary.txt"
exit "$status"
