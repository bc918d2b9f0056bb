#!/usr/bin/env bash
# The MLflow tracking server on the Ray head node (clusters/gpu.yaml runs `start` on every `ray up`).
#   bash ~/mobile-vla/clusters/mlflow_server.sh start    # (re)start it
#   bash ~/mobile-vla/clusters/mlflow_server.sh backup   # copy its stores to /shared/mlflow/backup
#   ray exec clusters/gpu.yaml 'bash ~/mobile-vla/clusters/mlflow_server.sh backup'   # from a laptop
#
# Stores: runs and the model registry in SQLite on the head's disk ($STATE, a host folder that
# outlives the container), or MLFLOW_BACKEND_STORE_URI (e.g. postgresql://... on RDS, which outlives
# `ray down` too). Artifacts (weights, ONNX, plans) are proxied by the server to the shared EFS
# folder, so clients need no storage credentials. `start` restores the SQLite stores from the
# latest backup when the head is new.
# Network: port 5000 on all of the head's interfaces, because Train workers on other nodes log to
# it; the security group admits no outside traffic, and basic auth is on (the admin user and
# password come from /etc/mobile-vla/mlflow_credentials, which every node's clients also read).
set -euo pipefail

STATE=${MLFLOW_STATE_DIR:-$HOME/mlflow}
SHARED=${MOBILE_VLA_SHARED:-/shared}
BACKUP=$SHARED/mlflow/backup
CREDENTIALS=${MLFLOW_CREDENTIALS_FILE:-/etc/mobile-vla/mlflow_credentials}
PORT=${MLFLOW_PORT:-5000}
HOST=${MLFLOW_HOST:-0.0.0.0}

credential() {  # credential KEY -> value of KEY in the [mlflow] section
  python - "$CREDENTIALS" "$1" <<'PY'
import configparser, sys
config = configparser.ConfigParser()
if not config.read(sys.argv[1]) or not config.has_option("mlflow", sys.argv[2]):
    sys.exit(f"{sys.argv[1]}: no [mlflow] {sys.argv[2]} (see docs/cluster.md)")
print(config["mlflow"][sys.argv[2]])
PY
}

answers() {  # answers URL: true once the server answers HTTP at all (401 included)
  python - "$1" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
PY
}

sqlite_copy() {  # sqlite_copy SRC DST: a consistent copy of a live SQLite database
  python - "$1" "$2" <<'PY'
import sqlite3, sys
source, target = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
source.backup(target)
target.close(); source.close()
PY
}

start() {
  mkdir -p "$STATE" "$SHARED/mlartifacts"
  chmod 700 "$STATE"
  for db in mlflow.db basic_auth.db flask_secret_key; do
    if [ ! -f "$STATE/$db" ] && [ -f "$BACKUP/$db" ]; then
      echo "mlflow_server: restoring $db from $BACKUP"
      cp "$BACKUP/$db" "$STATE/$db"
    fi
  done
  stop
  local user password
  user=$(credential mlflow_tracking_username)
  password=$(credential mlflow_tracking_password)
  cat > "$STATE/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$STATE/basic_auth.db
admin_username = $user
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  # The CSRF key must stay the same across restarts (and across servers sharing the stores).
  [ -s "$STATE/flask_secret_key" ] || (umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$STATE/flask_secret_key")
  MLFLOW_AUTH_CONFIG_PATH="$STATE/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$password" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE/flask_secret_key")" \
    MLFLOW_DISABLE_TELEMETRY=true setsid nohup mlflow server \
    --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}" \
    --artifacts-destination "$SHARED/mlartifacts" \
    --app-name basic-auth --host "$HOST" --port "$PORT" \
    >> "$STATE/server.log" 2>&1 < /dev/null &
  echo $! > "$STATE/server.pid"
  for _ in $(seq 90); do
    kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null || break
    if answers "http://127.0.0.1:$PORT/health"; then
      echo "mlflow_server: up on port $PORT (log: $STATE/server.log)"
      return 0
    fi
    sleep 2
  done
  echo "mlflow_server: not answering on port $PORT; last lines of $STATE/server.log:" >&2
  tail -n 30 "$STATE/server.log" >&2
  return 1
}

stop() {
  if [ -f "$STATE/server.pid" ]; then
    local pid
    pid=$(cat "$STATE/server.pid")
    # setsid made the server its own process group: end the group (gunicorn/uvicorn workers too).
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$STATE/server.pid"
  fi
}

backup() {
  mkdir -p "$BACKUP"
  for db in mlflow.db basic_auth.db; do
    if [ -f "$STATE/$db" ]; then
      sqlite_copy "$STATE/$db" "$BACKUP/$db.tmp" && mv "$BACKUP/$db.tmp" "$BACKUP/$db"
      cp "$BACKUP/$db" "$BACKUP/$db.$(date +%Y%m%d-%H%M%S)"
    fi
  done
  [ -f "$STATE/flask_secret_key" ] && (umask 077 && cp "$STATE/flask_secret_key" "$BACKUP/flask_secret_key")
  echo "mlflow_server: stores copied to $BACKUP"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  backup) backup ;;
  *) echo "usage: $0 start|stop|backup" >&2; exit 2 ;;
esac
