#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit, property and integration tests (the integration tests start
# the real `ferry` binary on port 0 with a temporary data dir).
#
# It installs and starts what the tests need when it is missing, so it works on a fresh Debian
# machine that has only the Rust toolchain. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[ops/test.sh] %s\n' "$*" >&2; }

# The C toolchain builds the bundled SQLite; everything else comes from crates.io.
ensure_build_tools() {
  if ! command -v cc >/dev/null 2>&1; then
    log "installing a C compiler (bundled SQLite builds with it)"
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

ensure_build_tools

log "running the test suite"
# One build shared by every test binary; tests run in parallel within each binary.
cargo test --workspace --locked "$@"
