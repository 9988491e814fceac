#!/usr/bin/env bash
# A Prefect server for operators: API auth on, a process worker, every deployment, the Blocks.
#
#   scripts/serve.sh VENV_BIN SPEC WORKDIR start|stop
#
# start: server on 127.0.0.1 (home WORKDIR/prefect, a generated API auth string kept only in
# WORKDIR/prefect/env.sh, mode 0600), work pool `drp-campaign`, `prefect deploy` of
# deployments/prefect.yaml, one worker in the background (PID in WORKDIR/prefect/worker.pid),
# the embedded default's seeded repositories and the DataFacility Blocks naming them.
# stop: the worker, then the server.
set -euo pipefail
BIN=$1 SPEC=$2 WORKDIR=$3 VERB=$4
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
HOME_DIR=$WORKDIR/prefect
PIDFILE=$HOME_DIR/worker.pid

stop_worker() {
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
}

case "$VERB" in
  start)
    if ! "$BIN/python" "$HERE/prefect_server.py" status --home "$HOME_DIR" >/dev/null 2>&1; then
      "$BIN/python" "$HERE/prefect_server.py" start --home "$HOME_DIR" --generate-auth
    fi
    # shellcheck disable=SC1091
    source "$HOME_DIR/env.sh"
    cd "$ROOT"
    "$BIN/prefect" --no-prompt work-pool create drp-campaign --type process --overwrite >/dev/null
    DRP_CAMPAIGN_HOME=$ROOT "$BIN/prefect" --no-prompt deploy --all \
      --prefect-file deployments/prefect.yaml
    "$BIN/drp-campaign" blocks register
    "$BIN/drp-campaign" seed "$SPEC" --workdir "$WORKDIR"
    "$BIN/drp-campaign" blocks local --spec "$SPEC" --workdir "$WORKDIR" --overwrite
    if [ ! -f "$PIDFILE" ] || ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      PATH="$BIN:$PATH" setsid "$BIN/prefect" worker start --pool drp-campaign --type process \
        >"$HOME_DIR/worker.log" 2>&1 < /dev/null &
      echo $! > "$PIDFILE"
    fi
    echo "worker pid $(cat "$PIDFILE"), log $HOME_DIR/worker.log"
    echo "UI and API: $(grep -o 'http://[^ ]*' "$HOME_DIR/env.sh" | head -1 | sed 's|/api$||')"
    echo "then: source $HOME_DIR/env.sh && prefect deployment run 'drp-step/default' -p step=step1"
    ;;
  stop)
    stop_worker
    "$BIN/python" "$HERE/prefect_server.py" stop --home "$HOME_DIR" || true
    ;;
  *) echo "usage: $0 VENV_BIN SPEC WORKDIR start|stop" >&2; exit 2 ;;
esac
