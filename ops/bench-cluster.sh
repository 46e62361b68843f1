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
# FERRY_BENCH_SCENARIO=failover replaces step 4 by node loss: FERRY_BENCH_RESTART_AT seconds into
# the second run (label `failover`), n3 is killed with SIGKILL. With `failover = "auto"` in
# FERRY_BENCH_NODE_ENV the script only waits; otherwise it waits until n3 reads `dead` and runs
# `ferry admin failover n3`. Under `local` the load tool runs with `--reserved-gaps` (the gaps
# readers are told about are the reserved seqs, not violations). Meanwhile a probe appends every 20 ms (curl, through n1) to a
# conversation of one of n3's slots: the time from the kill (and from the command) to its first
# acknowledged append is what is measured. FERRY_BENCH_DOWN_FOR seconds after that (default 10),
# n3 starts again on its data dir; the script waits until it is active, settles, and reads what
# it restored (`ferry_restored_messages_total`) and the slot map's reserved seqs. The load tool's
# log check (every acknowledged key at its seq on every node, gaps only where pages report
# reserved seqs) judges the run.
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
# settings for every node, e.g. "FERRY_CLUSTER__DURABILITY=archive"), FERRY_BENCH_SCENARIO
# (`rolling`, the default, or `failover`), FERRY_BENCH_DOWN_FOR (failover: seconds n3 stays down
# after its slots took appends again, default 10). Exit status 0 only when both runs passed the
# load tool's checks and every restart (or the failover) finished in time.
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
scenario="${FERRY_BENCH_SCENARIO:-rolling}"
down_for="${FERRY_BENCH_DOWN_FOR:-10}"
case "$scenario" in rolling | failover) ;; *) echo "FERRY_BENCH_SCENARIO: rolling or failover" >&2; exit 2 ;; esac
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="${FERRY_BENCH_OUT:-$(mktemp -d -t ferry-bench-cluster-XXXXXX)}"
work="$(mktemp -d -t ferry-bench-cluster-work-XXXXXX)"
key=bench-admin-key-0001
# One key drives the whole load (and a load tool socket joins hundreds of conversations): the
# [rate] limits and max_topics_per_socket would refuse most of it (FERRY_BENCH_RATE_LIMITS=on
# keeps them on, with ceilings no run reaches, to measure what checking them costs).
if [ "${FERRY_BENCH_RATE_LIMITS:-off}" = on ]; then
  rate_env=(FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 FERRY_RATE__APPENDS=100000000/s FERRY_RATE__CONNECTS_PER_IP=100000000/s FERRY_RATE__AUTH_FAILURES_PER_IP=100000000/s FERRY_RATE__EPHEMERAL=100000000/s)
else
  rate_env=(FERRY_LIMITS__MAX_TOPICS_PER_SOCKET=100000 FERRY_RATE__APPENDS=0 FERRY_RATE__CONNECTS_PER_IP=0 FERRY_RATE__AUTH_FAILURES_PER_IP=0 FERRY_RATE__EPHEMERAL=0)
fi
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
  "${env_args[@]}" "${extra[@]}" FERRY_BOOTSTRAP_API_KEY="$key" FERRY_LIMITS__SOCKET_IN_FLIGHT=1024 "${rate_env[@]}" \
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

# probe_conversation NODE: creates conversations until one lands in a slot NODE owns; prints it.
probe_conversation() {
  local owned i id slot
  owned="$(admin GET /admin/slots | jq -c --arg n "$1" '[.slots[] | select(.owner == $n) | .slot]')"
  for i in $(seq 0 500); do
    id="failover-probe-$i"
    slot="$(curl -sf --max-time 5 -X PUT -H "authorization: Bearer $key" \
      -H 'content-type: application/json' -d '{"participants":["probe"]}' \
      "http://127.0.0.1:${listen[1]}/v1/conversations/$id" | jq .slot)" || continue
    if jq -e --argjson s "$slot" 'index($s) != null' <<<"$owned" >/dev/null; then
      echo "$id"
      return 0
    fi
  done
  return 1
}

probe_n=0
# probe_until_ok CONVERSATION: appends through n1 every 20 ms until one is acknowledged.
probe_until_ok() {
  local deadline code
  deadline=$(($(date +%s) + step_timeout))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    probe_n=$((probe_n + 1))
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -X POST \
      -H "authorization: Bearer $key" -H 'content-type: application/json' \
      -d "{\"sender\":\"probe\",\"content\":{\"n\":$probe_n},\"idempotency_key\":\"probe-$probe_n\"}" \
      "http://127.0.0.1:${listen[1]}/v1/conversations/$1/messages")" || true
    [ "$code" = 201 ] && return 0
    sleep 0.02
  done
  return 1
}

# restored I: ferry_restored_messages_total on node I.
restored() {
  curl -sf --max-time 5 "http://127.0.0.1:${admin[$1]}/metrics" |
    awk '/^ferry_restored_messages_total/ { n += $NF } END { printf "%d", n }'
}

failover_run() {
  local auto=0 probe t_kill t_dead t_cmd t_ok t_up t_active t_settled cmd_out
  case " ${FERRY_BENCH_NODE_ENV:-} " in *" FERRY_CLUSTER__FAILOVER=auto "*) auto=1 ;; esac
  probe="$(probe_conversation n3)" || {
    log "found no conversation in a slot of n3"
    return 1
  }
  log "failover: ${rolling_duration}s at ${rate}/s, SIGKILL n3 at ${restart_at}s; probe $probe"
  # Under `local`, the failover reserves seqs that readers are told about as gaps.
  local gaps=(--reserved-gaps)
  case " ${FERRY_BENCH_NODE_ENV:-} " in *" FERRY_CLUSTER__DURABILITY=archive "*) gaps=() ;; esac
  loadtest --duration "$rolling_duration" --label "failover" --json "$out/failover.json" \
    "${gaps[@]}" >"$out/failover.txt" 2>&1 &
  loadtest_pid=$!
  sleep "$restart_at"
  probe_until_ok "$probe" || return 1
  t_kill="$(now)"
  kill -KILL "${pid[3]}"
  wait "${pid[3]}" 2>/dev/null || true
  pid[3]=""
  log "n3 killed"
  if [ "$auto" = 1 ]; then
    probe_until_ok "$probe" || return 1
    t_ok="$(now)"
    t_dead="" t_cmd=""
  else
    until_status "n3 dead" 'any(.nodes[]; .id == "n3" and .state == "dead")' || return 1
    t_dead="$(now)"
    t_cmd="$(now)"
    cmd_out="$(FERRY_API_KEY="$key" "$work/bin/ferry" admin failover n3 \
      --admin-url "http://127.0.0.1:${admin[1]}" 2>&1)" || {
      log "ferry admin failover n3 failed: $cmd_out"
      return 1
    }
    probe_until_ok "$probe" || return 1
    t_ok="$(now)"
    log "$(head -1 <<<"$cmd_out")"
  fi
  printf 'mode\tkill_to_dead_ms\tcommand_to_append_ms\tkill_to_append_ms\tdown_for_s\tstart_to_active_ms\tsettle_ms\trestored\treserved_conversations\treserved_seqs\treserved_restored\n' \
    >"$out/failover.tsv"
  log "n3's slots take appends again $(ms "$t_kill" "$t_ok") ms after the kill"
  sleep "$down_for"
  t_up="$(now)"
  start_node 3
  until_status "n3 active and ready" \
    'any(.nodes[]; .id == "n3" and .state == "active" and .ready)' || return 1
  t_active="$(now)"
  settle >/dev/null || return 1
  t_settled="$(now)"
  local totals
  totals="$(admin GET /admin/slots | jq -r '[.slots[] | .reserved // {conversations: 0, seqs: 0, restored: 0}]
    | "\(map(.conversations) | add)\t\(map(.seqs) | add)\t\(map(.restored) | add)"')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$([ "$auto" = 1 ] && echo auto || echo manual)" \
    "$([ -n "$t_dead" ] && ms "$t_kill" "$t_dead" || echo -)" \
    "$([ -n "$t_cmd" ] && ms "$t_cmd" "$t_ok" || echo -)" \
    "$(ms "$t_kill" "$t_ok")" "$down_for" "$(ms "$t_up" "$t_active")" \
    "$(ms "$t_active" "$t_settled")" "$(restored 3)" "$totals" >>"$out/failover.tsv"
}

if [ "$scenario" = failover ]; then
  rolling_status=0
  restarts_ok=1
  failover_run || restarts_ok=0
  if [ -n "$loadtest_pid" ]; then
    wait "$loadtest_pid" || rolling_status=$?
    loadtest_pid=""
  fi
  cat "$out/failover.txt" >&2
else
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

fi

# --- summary ---------------------------------------------------------------------------------

summary() {
  local second="rolling"
  [ "$scenario" = failover ] && second="failover"
  local s="$out/steady.json" r="$out/$second.json"
  echo "$([ "$scenario" = failover ] && echo "Node loss and failover" || echo "Rolling restart") of 3 nodes under load ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "load: ${rate} appends/s over 3 nodes, 64 conversations, 6 WebSocket writers, 200-byte payloads, 1 subscriber per conversation"
  for run in steady "$second"; do
    local f="$out/$run.json"
    if [ ! -s "$f" ]; then
      echo "$run: no report (see $out/$run.txt)"
      continue
    fi
    jq -r --arg run "$run" '
      def v: (.cluster.check.violations | del(.missing, .reserved_gaps, .reserved_seqs) | [.[]] | add);
      def reserved: ((.cluster.check.violations.reserved_gaps // 0) + (.delivery.violations.reserved_gaps // 0));
      def r: (. * 100 | round) / 100;
      "\($run): \(.duration_s)s  acked \(.ok)/\(.scheduled)  errors \(.errors)  skipped \(.skipped)  try_again \(.try_again)"
      + (if (.cluster.try_again_by_detail | length) > 0
         then " (" + (.cluster.try_again_by_detail | to_entries | map("\(.key) \(.value)") | join(", ")) + ")"
         else "" end)
      + "\n  ack ms: p50 \(.ack_latency.p50_ms | r)  p99 \(.ack_latency.p99_ms | r)  p99.9 \(.ack_latency.p999_ms | r)  max \(.ack_latency.max_ms | r);  worst second p99 \([.timeline[].p99_ms] | max // 0 | r)"
      + "\n  reconnects: writers \(.cluster.writer_reconnects) (\(.cluster.writer_going_away) going away, \(.cluster.writer_socket_cuts) cut, \(.cluster.resent) sends re-sent), subscribers \(.cluster.subscriber_reconnects) (\(.cluster.subscriber_going_away) going away)"
      + "\n  delivered \(.delivery.delivered)/\(.delivery.expected);  log check: \(.cluster.check.messages_read) messages from \(.cluster.check.targets_read) nodes, "
      + (if v == 0 then "clean" else "\(v) violations" end)
      + (if reserved > 0 then " (\(reserved) reserved gaps read or pushed, accepted)" else "" end)
      + "\n  " + (if (.failures | length) == 0 then "passed" else "FAILED: " + (.failures | join("; ")) end)
    ' "$f"
  done
  if [ "$scenario" = failover ]; then
    echo "failover (kill_to_dead: SIGKILL until n3 reads dead; command/kill_to_append: until the probe's first ack; restored: n3's ferry_restored_messages_total):"
    [ -s "$out/failover.tsv" ] && column -t -s $'\t' "$out/failover.tsv" | sed 's/^/  /'
    [ "$restarts_ok" = 1 ] || echo "  the failover did NOT finish (see the log above)"
    echo "reports: $out"
    return
  fi
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
