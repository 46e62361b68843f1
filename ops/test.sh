#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit, property and integration tests (the integration tests start
# the real `ferry` binary on port 0 with a temporary data dir).
#
# It installs and starts what the tests need when it is missing (a C compiler, PostgreSQL, the
# s3s-fs S3 server, Node with the phoenix client, redis-server, nats-server and promtool), so it
# works on a fresh Debian machine that has only the Rust toolchain. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[ops/test.sh] %s\n' "$*" >&2; }

# The C toolchain builds the bundled SQLite (cc) and jemalloc (cc and make); everything else
# comes from crates.io.
ensure_build_tools() {
  if ! command -v cc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
    log "installing a C toolchain (bundled SQLite and jemalloc build with it)"
    apt_install build-essential
  fi
}

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "cannot install $*: no apt-get on this machine; install it by hand"
    exit 1
  fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ $apt_updated = 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

pg_bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

pg_answers() { # URL
  psql "$1" -Atqc 'select 1' >/dev/null 2>&1
}

# The Postgres tests need a server whose user may CREATE DATABASE (each test makes its own
# `ferry_test_<random>` and drops it), plus the server binaries (initdb, pg_ctl) for the test that
# runs a private cluster and stops it. FERRY_TEST_DATABASE_URL, when set, names the server to use.
ensure_postgres() {
  if [ -z "$(pg_bin_dir)" ] || ! command -v psql >/dev/null 2>&1; then
    log "installing PostgreSQL (server binaries and psql)"
    apt_install postgresql
  fi
  local url="${FERRY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
  if ! pg_answers "$url" && [ -z "${FERRY_TEST_DATABASE_URL:-}" ]; then
    if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
      log "starting the local PostgreSQL cluster"
      local version
      version="$(ls /etc/postgresql | sort -V | tail -n 1)"
      local sudo=""
      [ "$(id -u)" = 0 ] || sudo="sudo"
      $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
      for _ in $(seq 1 60); do
        (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && break
        sleep 0.5
      done
    fi
    if ! pg_answers "$url"; then
      # A fresh Debian install asks for a password on TCP; give the superuser one through the
      # local socket (peer auth) and use it.
      log "setting a password for the postgres role (TCP auth is not trust here)"
      if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- psql -qc "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
      else
        sudo -u postgres psql -qc "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
      fi
      url="postgres://postgres:postgres@127.0.0.1:5432/postgres"
    fi
  fi
  if ! pg_answers "$url"; then
    log "cannot reach PostgreSQL at ${url%%@*}@… ; set FERRY_TEST_DATABASE_URL"
    exit 1
  fi
  export FERRY_TEST_DATABASE_URL="$url"
  # The Postgres tests fail instead of skipping when this is set.
  export FERRY_REQUIRE_POSTGRES=1
  log "postgres: $(psql "$url" -Atqc 'show server_version')"
}

# S3-compatible object storage for the cold-tier tests: each test starts its own s3s-fs server
# (private port and directory) from this binary, and may stop and restart it.
ensure_s3s_fs() {
  local bin="${FERRY_TEST_S3S_FS:-}"
  if [ -z "$bin" ]; then
    bin="$(command -v s3s-fs || true)"
    [ -n "$bin" ] || bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
  fi
  if [ ! -x "$bin" ]; then
    log "installing s3s-fs 0.14.1 (S3-compatible test server; takes a few minutes once)"
    cargo install --locked s3s-fs@0.14.1 --features binary --root "${CARGO_HOME:-$HOME/.cargo}" >&2
    bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
  fi
  export FERRY_TEST_S3S_FS="$bin"
  export FERRY_REQUIRE_S3=1
  log "s3s-fs: $bin"
}

# The WebSocket tests drive the official `phoenix` JavaScript client under Node.
ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "installing Node.js and npm (the phoenix client tests run under Node)"
    apt_install nodejs npm
  fi
  if [ ! -d tests/js/node_modules ]; then
    log "installing the phoenix client (npm ci in tests/js)"
    (cd tests/js && npm ci --no-audit --no-fund --silent)
  fi
}

# The load tool's smoke tests drive the peers it benchmarks against: Redis Streams and NATS
# JetStream, each started by the test on a private port.
ensure_peers() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (peers of the load tool's smoke tests)"
    apt_install "${missing[@]}"
  fi
  export FERRY_REQUIRE_PEERS=1
}

# promtool checks the Prometheus alert rules under ops/prometheus and runs their unit tests.
ensure_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian's prometheus package)"
    apt_install --no-install-recommends prometheus
  fi
  export FERRY_REQUIRE_PROMTOOL=1
}

# The fuzz targets under fuzz/ (cargo-fuzz layout; docs/security.md, "Fuzzing"). cargo-fuzz hands
# rustc nightly-only flags (-Z sanitizer coverage options); RUSTC_BOOTSTRAP=1 makes the stable
# toolchain accept them, so no nightly toolchain is needed.
CARGO_FUZZ_VERSION=0.13.2
ensure_cargo_fuzz() {
  if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION (takes a minute or two once)"
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION" >&2
  fi
}

# A short run of every target (FERRY_FUZZ_SECONDS each, 10 by default; 0 skips fuzzing), starting
# from the committed seeds. A crash, a panic or an input that runs past 10 s fails the test run;
# libFuzzer leaves the input under fuzz/artifacts/<target>/. No sanitizer: the decoders hold no
# unsafe code, and the build is several times faster without one.
run_fuzz_targets() {
  local seconds="${FERRY_FUZZ_SECONDS:-10}"
  [ "$seconds" != 0 ] || return 0
  ensure_cargo_fuzz
  # cargo-fuzz has no --locked: check the lock file first, as the other builds do.
  cargo fetch --locked --manifest-path fuzz/Cargo.toml
  log "building the fuzz targets"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none)
  local target out
  for target in $(cd fuzz && cargo fuzz list); do
    mkdir -p "fuzz/corpus/$target"
    out="fuzz/target/fuzz-$target.log"
    if (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" \
      "corpus/$target" "seeds/$target" -- -max_total_time="$seconds" -timeout=10) >"$out" 2>&1; then
      log "fuzz $target: $(grep -E '^Done [0-9]+ runs' "$out" || echo 'done')"
    else
      cat "$out" >&2
      log "fuzz target $target failed; the input is under fuzz/artifacts/$target/"
      exit 1
    fi
  done
}

ensure_build_tools
ensure_promtool
ensure_node
ensure_peers
ensure_postgres
ensure_s3s_fs

log "running the test suite"
# One build shared by every test binary; tests run in parallel within each binary.
cargo test --workspace --locked "$@"

run_fuzz_targets
