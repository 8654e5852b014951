#!/usr/bin/env bash
# Starts / stops the real services the integration tests use, on free loopback ports:
#   tansu (Kafka protocol, sqlite storage) and moto (S3 API, with a fresh bucket).
#   scripts/services.sh start   writes the connection settings to $STATE/env (sourced by the Makefile)
#   scripts/services.sh stop    stops what start started (safe to call twice)
set -euo pipefail

CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
STATE="${STRATA_SERVICES_DIR:-$CACHE/services}"
TANSU="$CACHE/tansu-0.6.0/bin/tansu"
MOTO_VENV="$CACHE/moto-5.2.5"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_port() { # host port seconds
  local deadline=$((SECONDS + $3))
  until python3 -c "import socket,sys; socket.create_connection(('$1',$2),1)" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then echo "services: nothing listens on $1:$2 after $3s" >&2; return 1; fi
    sleep 0.3
  done
}

stop() {
  for name in tansu moto; do
    if [ -f "$STATE/$name.pid" ]; then
      kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
      rm -f "$STATE/$name.pid"
    fi
  done
}

start() {
  stop
  rm -rf "$STATE" && mkdir -p "$STATE/tansu-data"
  local kafka_port s3_port
  kafka_port=$(free_port)
  s3_port=$(free_port)

  (cd "$STATE/tansu-data" && exec "$TANSU" broker \
      --listener-url "tcp://127.0.0.1:$kafka_port" \
      --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
      --storage-engine "sqlite://tansu.db" >"$STATE/tansu.log" 2>&1) &
  echo $! > "$STATE/tansu.pid"

  "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$STATE/moto.log" 2>&1 &
  echo $! > "$STATE/moto.pid"

  wait_port 127.0.0.1 "$kafka_port" 60 || { cat "$STATE/tansu.log" >&2; exit 1; }
  wait_port 127.0.0.1 "$s3_port" 60 || { cat "$STATE/moto.log" >&2; exit 1; }
  "$MOTO_VENV/bin/python" - "$s3_port" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.create_bucket(Bucket="strata-test")
PY
  cat > "$STATE/env" <<ENV
STRATA_TEST_BROKERS=127.0.0.1:$kafka_port
STRATA_TEST_S3_BUCKET=strata-test
AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
AWS_REGION=us-east-1
AWS_ACCESS_KEY_ID=test
AWS_SECRET_ACCESS_KEY=test
AWS_ALLOW_HTTP=true
STRATA_TEST_PROMETHEUS=$CACHE/prometheus-deb/usr/bin/prometheus
STRATA_TEST_PROMTOOL=$CACHE/prometheus-deb/usr/bin/promtool
STRATA_TEST_TANSU=$TANSU
STRATA_TEST_STUNNEL=$(command -v stunnel4 || true)
STRATA_TEST_DELTA_PYTHON=$CACHE/readers-deltalake-1.2.1/bin/python
STRATA_TEST_DEPLOY_PYTHON=$CACHE/deploy-tools/bin/python
ENV
  echo "services: tansu on 127.0.0.1:$kafka_port, moto on 127.0.0.1:$s3_port (logs in $STATE)" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
