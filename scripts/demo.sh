#!/usr/bin/env bash
# Run a whole campaign on a local Prefect server: seed the embedded default's repositories (the
# observatory's part: hub raws, calibrations, skymap; empty site Butlers), start the server (home
# in WORKDIR/prefect), save the sites' Blocks (naming those repositories), run the drp-campaign flow, print where the report is, and stop the
# server by PID (unless KEEP_SERVER=1, to look at the runs in the UI).
#
#   scripts/demo.sh VENV_BIN SPEC WORKDIR [--rucio]
#
# --rucio: start the local Rucio (scripts/rucio_local) and point the sites' Blocks at it.
set -euo pipefail
BIN=$1 SPEC=$2 WORKDIR=$3 MODE=${4:-}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
HOME_DIR=$WORKDIR/prefect

# Not a campaign stage: production starts from repositories that already hold all this.
"$BIN/drp-campaign" seed "$SPEC" --workdir "$WORKDIR"

started=0
if ! "$BIN/python" "$HERE/prefect_server.py" status --home "$HOME_DIR" >/dev/null 2>&1; then
  "$BIN/python" "$HERE/prefect_server.py" start --home "$HOME_DIR"
  started=1
fi
stop() {
  rc=$?
  if [ "$MODE" = "--rucio" ] && [ "${KEEP_SERVER:-0}" != 1 ]; then
    "$HERE/rucio_local/rucio-local.sh" stop "$WORKDIR/rucio" || true
  fi
  if [ "$started" = 1 ] && [ "${KEEP_SERVER:-0}" != 1 ]; then
    "$BIN/python" "$HERE/prefect_server.py" stop --home "$HOME_DIR" || true
  elif [ "$started" = 1 ]; then
    echo "Prefect server kept for the UI: $(grep -o 'http://[^ ]*' "$HOME_DIR/env.sh" | head -1)"
    echo "stop it with: $BIN/python $HERE/prefect_server.py stop --home $HOME_DIR"
  fi
  exit $rc
}
trap stop EXIT
# shellcheck disable=SC1091
source "$HOME_DIR/env.sh"

"$BIN/drp-campaign" blocks register
if [ "$MODE" = "--rucio" ]; then
  "$HERE/rucio_local/rucio-local.sh" start "$WORKDIR/rucio"
  "$BIN/drp-campaign" blocks local --spec "$SPEC" --workdir "$WORKDIR" --overwrite \
    --rucio-settings "$WORKDIR/rucio/rucio-local.json"
else
  "$BIN/drp-campaign" blocks local --spec "$SPEC" --workdir "$WORKDIR" --overwrite
fi
"$BIN/drp-campaign" run "$SPEC" --workdir "$WORKDIR"
