#!/usr/bin/env bash
# Installs the real services the integration tests run against, cached outside the clone so that
# a second run (and CI on the same machine) reuses them:
#   - tansu 0.6.0 (Kafka-protocol broker, sqlite storage via the libsql feature), from crates.io
#   - moto 5.2.5 (S3 API server), from PyPI, in its own virtualenv
#   - Prometheus and promtool from Debian's `prometheus` package (downloaded and unpacked into the
#     cache with apt-get download + dpkg-deb: no root, nothing installed system-wide)
#   - kubernetes-validate and PyYAML from PyPI, in a virtualenv (checks of deploy/)
#   - the Python deltalake package, in a virtualenv (reads the tables as users do)
# Needs only the Rust toolchain, Python 3, apt-get and the network to crates.io / PyPI / Debian.
#
# `install-tools.sh build-deps` installs only the C libraries the strata binary links (librdkafka's
# TLS, SASL and OIDC support): `make demo` and `make build` need those and nothing else.
set -euo pipefail

# Debian packages the build links against: OpenSSL (TLS, SCRAM, OAUTHBEARER/OIDC), Cyrus SASL
# (GSSAPI/Kerberos), libcurl (OIDC token fetching) and zlib (gzip). zstd, lz4 and snappy are
# compiled in from source. The runtime packages (libssl3, libsasl2-2, libcurl4, zlib1g) are what
# deploy/Dockerfile installs.
BUILD_PACKAGES=(libssl-dev libsasl2-dev libcurl4-openssl-dev zlib1g-dev pkg-config)
# The security tests put stunnel (TLS, mutual TLS) in front of tansu, moto and the registry
# stand-in, with certificates the tests make with the openssl command.
TEST_PACKAGES=(stunnel4 openssl)
apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "install-tools: installing Debian packages: ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
    { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}
apt_install "${BUILD_PACKAGES[@]}"
[ "${1:-}" = "build-deps" ] && exit 0
apt_install "${TEST_PACKAGES[@]}"

CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
TANSU_VERSION=0.6.0
MOTO_VERSION=5.2.5
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
MOTO_VENV="$CACHE/moto-$MOTO_VERSION"
PROMETHEUS_ROOT="$CACHE/prometheus-deb"
TOOLS_VENV="$CACHE/deploy-tools"
DELTALAKE_VERSION=1.2.1
READERS_VENV="$CACHE/readers-deltalake-$DELTALAKE_VERSION"
KUBERNETES_VALIDATE_VERSION=1.37.0
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

if [ ! -x "$PROMETHEUS_ROOT/usr/bin/promtool" ]; then
  echo "install-tools: unpacking Debian's prometheus package into $PROMETHEUS_ROOT" >&2
  rm -rf "$PROMETHEUS_ROOT" "$CACHE/prometheus-download"
  mkdir -p "$CACHE/prometheus-download"
  (cd "$CACHE/prometheus-download" && apt-get download prometheus >/dev/null)
  dpkg-deb -x "$CACHE"/prometheus-download/prometheus_*.deb "$PROMETHEUS_ROOT"
  rm -rf "$CACHE/prometheus-download"
fi

if [ ! -x "$TOOLS_VENV/bin/kubernetes-validate" ]; then
  echo "install-tools: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $TOOLS_VENV" >&2
  rm -rf "$TOOLS_VENV"
  python3 -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "pyyaml==6.0.3"
fi

if [ ! -x "$READERS_VENV/bin/python" ] || ! "$READERS_VENV/bin/python" -c "import deltalake" 2>/dev/null; then
  echo "install-tools: installing deltalake $DELTALAKE_VERSION (Python, how users read the tables) into $READERS_VENV" >&2
  rm -rf "$READERS_VENV"
  python3 -m venv "$READERS_VENV"
  "$READERS_VENV/bin/pip" install --quiet "deltalake==$DELTALAKE_VERSION"
fi

echo "TANSU=$TANSU_ROOT/bin/tansu"
echo "PROMETHEUS=$PROMETHEUS_ROOT/usr/bin/prometheus"
echo "PROMTOOL=$PROMETHEUS_ROOT/usr/bin/promtool"
echo "DEPLOY_TOOLS_PYTHON=$TOOLS_VENV/bin/python"
echo "MOTO_SERVER=$MOTO_VENV/bin/moto_server"
echo "STUNNEL=$(command -v stunnel4)"
