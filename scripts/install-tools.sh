#!/usr/bin/env bash
# Installs the real services the integration tests run against, cached outside the clone so that
# a second run (and CI on the same machine) reuses them:
#   - tansu 0.6.0 (Kafka-protocol broker, sqlite storage via the libsql feature), from crates.io
#   - moto 5.2.5 (S3 API server), from PyPI, in its own virtualenv
# Needs only the Rust toolchain, Python 3 and the network to crates.io / PyPI.
set -euo pipefail

CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
TANSU_VERSION=0.6.0
MOTO_VERSION=5.2.5
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
MOTO_VENV="$CACHE/moto-$MOTO_VERSION"
mkdir -p "$CACHE"

if [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
  echo "install-tools: building tansu $TANSU_VERSION into $TANSU_ROOT (takes ~8 min on 2 cores)" >&2
  # Its own target dir so it never collides with the project's build lock.
  CARGO_TARGET_DIR="$CACHE/tansu-build" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql --root "$TANSU_ROOT"
  rm -rf "$CACHE/tansu-build"
fi

if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
  echo "install-tools: installing moto $MOTO_VERSION into $MOTO_VENV" >&2
  rm -rf "$MOTO_VENV"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet "moto[server]==$MOTO_VERSION"
fi

echo "TANSU=$TANSU_ROOT/bin/tansu"
echo "MOTO_SERVER=$MOTO_VENV/bin/moto_server"
