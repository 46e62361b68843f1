#!/usr/bin/env bash
# Rolling restart of a three-node Ferry cluster under load: p99 append latency against the
# steady state (target: rolling p99 <= 2x steady p99). One run measures both:
#
#   ops/bench-cluster.sh
#   FERRY_BENCH_DURATION=10 FERRY_BENCH_ROLLING_DURATION=40 ops/bench-cluster.sh   # a quick one
#
# What it does, all on this machine and on private ports:
#  1. builds the release binaries (`cargo build --release -p ferry -p ferry-loadtest --locked`;
#     honours CARGO_TARGET_DIR);
#  2. creates a fresh Postgres database (FERRY_BENCH_POSTGRES, trust auth), starts a private
#     `redis-server --save "" --appendonly no` and three nodes exactly as docs/benchmarks.md
#     § "Cluster (3 nodes on one machine)" does: `FERRY_BOOTSTRAP_API_KEY=k
#     FERRY_LIMITS__SOCKET_IN_FLIGHT=1024 ferry serve --node-id nI --data-dir DIR --listen ...
#     --admin-listen ... --database-url ... --redis-url ... --cluster-secret s3`, and waits until
#     the cluster is balanced (every node active with slots, none moving or unassigned);
#  3. `steady`: `ferry-loadtest cluster --disrupt none` over the three nodes for
#     FERRY_BENCH_DURATION seconds at FERRY_BENCH_RATE appends/s (64 conversations, 6 WebSocket
#     writers, 200-byte payloads, one subscriber per conversation);
#  4. `rolling`: the same load for FERRY_BENCH_ROLLING_DURATION seconds while this script,
#     FERRY_BENCH_RESTART_AT seconds in, restarts n1, n2, n3 in turn: SIGTERM, wait for the exit
#     (the node drains its slots first and closes its sockets with 1001; the load tool's writers
#     and subscribers on it move to the next node, writers re-sending what was unanswered under
#     the same idempotency keys), start it again on the same data dir, ports and flags, wait
#     until it is `active`, then settle: POST /admin/rebalance and poll until no slot moves and
#     a further rebalance plans none (what the load tool's `--disrupt rebalance` does). Each
#     restart's timings (SIGTERM -> exited, start -> active, active -> settled) and slot moves
#     (out: the slots it owned, all handed over by its drain; back: the growth of
#     ferry_slot_moves_total{result="ok"} on the admin listeners, before/after, the restarted
#     node's new process counting from 0) go to restarts.tsv;
#  5. prints a summary (steady and rolling p50/p99, their ratio, acked/scheduled, try_again,
#     reconnects, the log check, the restarts) and writes it with both load tool reports
#     (steady.json/.txt, rolling.json/.txt), restarts.tsv and the nodes' logs to the output dir.
#
# The load tool never restarts a node itself (it only talks to its targets): the restarts are
# this script's. The rolling run must outlast the three restarts (the load tool reads every
# node back at the end); the script says so when it did not.
#
# Environment: FERRY_BENCH_DURATION (steady seconds, default 30), FERRY_BENCH_ROLLING_DURATION
# (default 60), FERRY_BENCH_RATE (appends/s, default 5000), FERRY_BENCH_MAX_OUTSTANDING (the
# load tool's --max-outstanding, default 1024: a send due beyond it is skipped and counted, so
# skips in the summary mean latency the p99 does not show), FERRY_BENCH_RESTART_AT (seconds
# after the rolling run's start before the first SIGTERM, default 5), FERRY_BENCH_RESTART_GAP
# (seconds between a settled node and the next SIGTERM, default 0), FERRY_BENCH_POSTGRES
# (server URL without a database, default postgres://postgres@127.0.0.1:5432),
# FERRY_BENCH_OUT (default: a new directory under $TMPDIR, kept), FERRY_BENCH_TIMEOUT (longest
# wait for each restart step and the load tool's --disrupt-timeout, default 120),
# FERRY_BENCH_KEEP=1 keeps the data dirs, FERRY_BENCH_NODE_ENV (space-separated KEY=VALUE
# settings for every node, e.g. "FERRY_CLUSTER__DURABILITY=archive"). Exit status 0 only when both runs passed the load
# tool's checks and every restart finished in time.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
duration="${FERRY_BENCH_DURATION:-30}"
rolling_duration="${FERRY_BENCH_ROLLING_DURATION:-60}"
rate="${FERRY_BENCH_RATE:-5000}"
max_outstanding="${FERRY_BENCH_MAX_OUTSTANDING:-1024}"
restart_at="${FERRY_BENCH_RESTART_AT:-5}"
restart_gap="${FERRY_BENCH_RESTART_GAP:-0}"
postgres="${FERRY_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432}"
step_timeout="${FERRY_BENCH_TIMEOUT:-120}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="${FERRY_BENCH_OUT:-$(mktemp -d -t ferry-bench-cluster-XXXXXX)}"
work="$(mktemp -d -t ferry-bench-cluster-work-XXXXXX)"
key=k
secret=s3
db="ferry_bench_$(date +%s)_$$"
nodes=(1 2 3)
declare -A pid listen admin starts
redis_pid=""
loadtest_pid=""
db_created=""

log() { printf '[bench-cluster] %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [ -n "$loadtest_pid" ] && kill "$loadtest_pid" 2>/dev/null || true
  for i in "${nodes[@]}"; do
    [ -n "${pid[$i]:-}" ] && kill -KILL "${pid[$i]}" 2>/dev/null || true
  done
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "$db_created" ]; then
    psql -q "$postgres/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 ||
      log "could not drop database $db"
  fi
  if [ "${FERRY_BENCH_KEEP:-0}" = 1 ]; then
    log "data dirs kept in $work"
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in cargo psql redis-server curl jq python3; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

now() { date +%s.%N; }
# ms FROM TO: milliseconds between two `now` readings.
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }

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
  die "nothing listens on 127.0.0.1:$port"
}

# --- the admin API (any node's admin listener acts for the whole cluster) --------------------

# admin METHOD PATH: the first answer of a node that is up; fails when none answers.
admin() {
  local method="$1" path="$2" i
  for i in "${nodes[@]}"; do
    if curl -sf --max-time 10 -X "$method" -H "authorization: Bearer $key" \
      "http://127.0.0.1:${admin[$i]}$path" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

cluster_status() { admin GET /admin/cluster; }

# rebalance: POST /admin/rebalance; prints the number of moves it planned.
rebalance() { admin POST /admin/rebalance | jq '.moves | length'; }

# until_status WHAT JQ_FILTER: polls /admin/cluster until the filter holds, for at most the
# step timeout.
until_status() {
  local what="$1" filter="$2" deadline last=""
  deadline=$(($(date +%s) + step_timeout))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if last="$(cluster_status)" && jq -e "$filter" >/dev/null <<<"$last"; then
      return 0
    fi
    sleep 0.1
  done
  log "timed out after ${step_timeout}s waiting for: $what"
  log "last status: $last"
  return 1
}

balanced='(.nodes | length) == 3 and all(.nodes[]; .state == "active" and .slots > 0)
  and .unassigned_slots == 0 and .moving_slots == 0 and .unavailable_slots == 0'

# settle: rebalance, then poll until no slot is moving and a further rebalance plans no move
# (the leader moves at most max_moves slots at once, one round at a time, so "nothing moving"
# alone can be the pause between two rounds). Prints the moves the first rebalance planned.
settle() {
  local first more deadline
  first="$(rebalance)" || return 1
  deadline=$(($(date +%s) + step_timeout))
  while :; do
    until_status "no slot moving" '.moving_slots == 0' || return 1
    cluster_status | jq -e '.unavailable_slots == 0 and .unassigned_slots == 0' >/dev/null ||
      {
        log "slots unavailable or unassigned after a rebalance"
        return 1
      }
    more="$(rebalance)" || return 1
    [ "$more" = 0 ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "a rebalance still plans $more moves ${step_timeout}s after the first"
      return 1
    fi
    sleep 0.1
  done
  echo "$first"
}

# slot_moves I: ferry_slot_moves_total{result="ok"} on node I's admin listener (0 when down).
slot_moves() {
  local metrics
  metrics="$(curl -sf --max-time 5 "http://127.0.0.1:${admin[$1]}/metrics" 2>/dev/null)" || true
  awk '/^ferry_slot_moves_total\{.*result="ok"/ { n += $NF } END { printf "%d", n }' <<<"$metrics"
}

# --- processes -------------------------------------------------------------------------------

# start_node I: starts node nI in the background (same data dir, ports and flags every time) and
# waits for its ready line.
start_node() {
  local i="$1" out_file env_args=(env) var
  starts[$i]=$((${starts[$i]:-0} + 1))
  out_file="$out/logs/n$i.${starts[$i]}.log"
  # The caller's FERRY_* settings (this script's knobs too) must not reach the nodes.
  for var in $(compgen -e); do
    case "$var" in FERRY_*) env_args+=(-u "$var") ;; esac
  done
  # FERRY_BENCH_NODE_ENV: extra settings for the nodes, e.g. FERRY_CLUSTER__DURABILITY=archive.
  local extra=()
  read -r -a extra <<<"${FERRY_BENCH_NODE_ENV:-}"
  "${env_args[@]}" "${extra[@]}" FERRY_BOOTSTRAP_API_KEY="$key" FERRY_LIMITS__SOCKET_IN_FLIGHT=1024 \
    "$work/bin/ferry" serve --node-id "n$i" --data-dir "$work/n$i" \
    --listen "127.0.0.1:${listen[$i]}" --admin-listen "127.0.0.1:${admin[$i]}" \
    --database-url "$postgres/$db" --redis-url "redis://127.0.0.1:$redis_port" \
    --cluster-secret "$secret" >"$out_file" 2>&1 &
  pid[$i]=$!
  local deadline=$(($(date +%s) + step_timeout))
  until grep -q "ferry ready" "$out_file"; do
    kill -0 "${pid[$i]}" 2>/dev/null || die "n$i exited before it was ready (see $out_file)"
    [ "$(date +%s)" -lt "$deadline" ] || die "n$i not ready within ${step_timeout}s"
    sleep 0.05
  done
}

# stop_node I: SIGTERM, then wait for the exit (the node drains first); sets exit_status. Not
# in a subshell: only this shell can wait for its children.
stop_node() {
  local i="$1" deadline
  exit_status=0
  kill -TERM "${pid[$i]}"
  deadline=$(($(date +%s) + step_timeout))
  while kill -0 "${pid[$i]}" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "n$i did not exit within ${step_timeout}s of SIGTERM"
      return 1
    fi
    sleep 0.02
  done
  wait "${pid[$i]}" || exit_status=$?
  pid[$i]=""
}

loadtest() {
  "$work/bin/ferry-loadtest" cluster --api-key "$key" --admin-key "$key" \
    --target "$targets" --admin-targets "$admin_targets" --conversations 64 --connections 6 \
    --payload 200 --subscribers 1 --rate "$rate" --max-outstanding "$max_outstanding" \
    --disrupt none \
    --disrupt-timeout "$step_timeout" --no-progress "$@"
}

# --- the run ---------------------------------------------------------------------------------

mkdir -p "$out/logs"
log "reports go to $out"
log "building the release binaries"
cargo build --release --locked -p ferry -p ferry-loadtest >&2
# Run copies: a build in the same target dir during the run must not change what runs (the
# restarted nodes start the same binary as the others).
mkdir -p "$work/bin"
cp "$target_dir/release/ferry" "$target_dir/release/ferry-loadtest" "$work/bin/"

log "database $db on $postgres"
psql -q "$postgres/postgres" -c "CREATE DATABASE $db" >/dev/null
db_created=1

redis_port="$(free_port)"
mkdir -p "$work/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work/redis" --save "" \
  --appendonly no --daemonize no >"$out/logs/redis.log" 2>&1 &
redis_pid=$!
wait_port "$redis_port"

for i in "${nodes[@]}"; do
  listen[$i]="$(free_port)"
  admin[$i]="$(free_port)"
done
targets="$(for i in "${nodes[@]}"; do printf 'http://127.0.0.1:%s,' "${listen[$i]}"; done)"
targets="${targets%,}"
admin_targets="$(for i in "${nodes[@]}"; do printf 'http://127.0.0.1:%s,' "${admin[$i]}"; done)"
admin_targets="${admin_targets%,}"
for i in "${nodes[@]}"; do
  start_node "$i"
  log "n$i ready: listen ${listen[$i]}, admin ${admin[$i]}, pid ${pid[$i]}"
done
until_status "a balanced cluster" "$balanced" || die "the cluster did not balance"
# "Nothing moving" can be a pause between two rounds of the first placement: settle as well.
settle >/dev/null || die "the cluster did not settle"
log "balanced: $(cluster_status | jq -c '[.nodes[] | {(.id): .slots}] | add')"

steady_status=0
log "steady: ${duration}s at ${rate}/s"
loadtest --duration "$duration" --label "steady" --json "$out/steady.json" \
  >"$out/steady.txt" 2>&1 || steady_status=$?
cat "$out/steady.txt" >&2

rolling_status=0
restarts_ok=1
log "rolling: ${rolling_duration}s at ${rate}/s, restarts from ${restart_at}s"
loadtest --duration "$rolling_duration" --label "rolling restart" --json "$out/rolling.json" \
  >"$out/rolling.txt" 2>&1 &
loadtest_pid=$!
rolling_began="$(now)"
sleep "$restart_at"
printf 'node\tsigterm_at_s\tdrain_exit_ms\texit_status\tstart_active_ms\tsettle_ms\tslots_moved_out\tmoves_back\trebalance_planned\tslot_moves_ok_before\tslot_moves_ok_after\n' \
  >"$out/restarts.tsv"
for i in "${nodes[@]}"; do
  before_counts=""
  for j in "${nodes[@]}"; do before_counts+="n$j=$(slot_moves "$j") "; done
  slots_before="$(cluster_status | jq --arg n "n$i" '.nodes[] | select(.id == $n) | .slots')"
  t0="$(now)"
  log "restart n$i: SIGTERM (owns $slots_before slots)"
  if ! stop_node "$i"; then
    restarts_ok=0
    break
  fi
  t1="$(now)"
  [ "$exit_status" = 0 ] || {
    log "n$i exited with status $exit_status"
    restarts_ok=0
  }
  start_node "$i"
  if ! until_status "n$i active and ready" \
    "any(.nodes[]; .id == \"n$i\" and .state == \"active\" and .ready)"; then
    restarts_ok=0
    break
  fi
  t2="$(now)"
  if ! planned="$(settle)"; then
    restarts_ok=0
    break
  fi
  t3="$(now)"
  after_counts=""
  moves_back=0
  for j in "${nodes[@]}"; do
    n="$(slot_moves "$j")"
    after_counts+="n$j=$n "
    if [ "$j" = "$i" ]; then
      # A new process counts from 0.
      moves_back=$((moves_back + n))
    else
      b="$(sed -n "s/.*n$j=\([0-9]*\).*/\1/p" <<<"$before_counts")"
      moves_back=$((moves_back + n - b))
    fi
  done
  row="$(printf 'n%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$i" \
    "$(awk -v a="$rolling_began" -v b="$t0" 'BEGIN { printf "%.1f", b - a }')" \
    "$(ms "$t0" "$t1")" "$exit_status" "$(ms "$t1" "$t2")" "$(ms "$t2" "$t3")" \
    "$slots_before" "$moves_back" "$planned" "${before_counts% }" "${after_counts% }")"
  echo "$row" >>"$out/restarts.tsv"
  log "n$i back: drain+exit $(ms "$t0" "$t1") ms, start->active $(ms "$t1" "$t2") ms, settled in $(ms "$t2" "$t3") ms, $moves_back moves back"
  if [ "$(ms "$rolling_began" "$t3")" -gt $((rolling_duration * 1000)) ]; then
    log "n$i settled after the rolling run's traffic ended: raise FERRY_BENCH_ROLLING_DURATION"
    restarts_ok=0
  fi
  [ "$i" = 3 ] || sleep "$restart_gap"
done
wait "$loadtest_pid" || rolling_status=$?
loadtest_pid=""
cat "$out/rolling.txt" >&2

# --- summary ---------------------------------------------------------------------------------

summary() {
  local s="$out/steady.json" r="$out/rolling.json"
  echo "Rolling restart of 3 nodes under load ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "load: ${rate} appends/s over 3 nodes, 64 conversations, 6 WebSocket writers, 200-byte payloads, 1 subscriber per conversation"
  for run in steady rolling; do
    local f="$out/$run.json"
    if [ ! -s "$f" ]; then
      echo "$run: no report (see $out/$run.txt)"
      continue
    fi
    jq -r --arg run "$run" '
      def v: (.cluster.check.violations | [.[]] | add);
      def r: (. * 100 | round) / 100;
      "\($run): \(.duration_s)s  acked \(.ok)/\(.scheduled)  errors \(.errors)  skipped \(.skipped)  try_again \(.try_again)"
      + (if (.cluster.try_again_by_detail | length) > 0
         then " (" + (.cluster.try_again_by_detail | to_entries | map("\(.key) \(.value)") | join(", ")) + ")"
         else "" end)
      + "\n  ack ms: p50 \(.ack_latency.p50_ms | r)  p99 \(.ack_latency.p99_ms | r)  p99.9 \(.ack_latency.p999_ms | r)  max \(.ack_latency.max_ms | r);  worst second p99 \([.timeline[].p99_ms] | max // 0 | r)"
      + "\n  reconnects: writers \(.cluster.writer_reconnects) (\(.cluster.writer_going_away) going away, \(.cluster.writer_socket_cuts) cut, \(.cluster.resent) sends re-sent), subscribers \(.cluster.subscriber_reconnects) (\(.cluster.subscriber_going_away) going away)"
      + "\n  delivered \(.delivery.delivered)/\(.delivery.expected);  log check: \(.cluster.check.messages_read) messages from \(.cluster.check.targets_read) nodes, "
      + (if v == 0 then "clean" else "\(v) violations" end)
      + "\n  " + (if (.failures | length) == 0 then "passed" else "FAILED: " + (.failures | join("; ")) end)
    ' "$f"
  done
  if [ -s "$s" ] && [ -s "$r" ]; then
    jq -rn --slurpfile s "$s" --slurpfile r "$r" '
      def r: (. * 100 | round) / 100;
      ($s[0].ack_latency.p99_ms) as $sp | ($r[0].ack_latency.p99_ms) as $rp
      | if $sp > 0 then
          ($rp / $sp) as $x
          | "p99 rolling / steady: \($rp | r) / \($sp | r) ms = \($x | r)x (target <= 2x: \(if $x <= 2 then "met" else "NOT met" end))"
        else "p99 ratio: no steady p99" end'
  fi
  echo "restarts (drain+exit = SIGTERM to exit; start->active; settled = rebalance until nothing moves or is planned):"
  column -t -s $'\t' "$out/restarts.tsv" | sed 's/^/  /'
  [ "$restarts_ok" = 1 ] || echo "  the restarts did NOT all finish in time (see the log above)"
  echo "reports: $out"
}
summary | tee "$out/summary.txt"

[ "$steady_status" = 0 ] && [ "$rolling_status" = 0 ] && [ "$restarts_ok" = 1 ]
