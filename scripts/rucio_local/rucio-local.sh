#!/usr/bin/env bash
# A real Rucio 41.5.1 on 127.0.0.1 for tests and demos (PostgreSQL, server, daemons).
#
#   scripts/rucio_local/rucio-local.sh venv              # build .venv-rucio only
#   scripts/rucio_local/rucio-local.sh start  WORKDIR    # idempotent
#   scripts/rucio_local/rucio-local.sh stop   WORKDIR
#   scripts/rucio_local/rucio-local.sh env    WORKDIR    # eval "$(... env WORKDIR)"
#   scripts/rucio_local/rucio-local.sh status WORKDIR
#   scripts/rucio_local/rucio-local.sh add-vo WORKDIR VO
#
# The server's pins (SQLAlchemy 2.0, urllib3 1.26) clash with the project's, so it lives in its own
# virtual environment, .venv-rucio at the project root, built once with Python 3.11 (pyenv's when
# python3.11 is not on PATH). See launcher.py for what start does.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${DRP_RUCIO_VENV:-$ROOT/.venv-rucio}"

find_python311() {
  if python3.11 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then
    echo python3.11; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.11(\.|$)' | sort -V | tail -1)"
    if [ -n "$v" ]; then echo "env PYENV_VERSION=$v python3.11"; return; fi
  fi
  echo "rucio-local: needs Python 3.11 (python3.11 on PATH, or 'pyenv install 3.11')" >&2
  exit 1
}

ensure_venv() {
  [ -f "$VENV/.installed" ] && return
  local py
  py="$(find_python311)"
  echo "rucio-local: building $VENV with $py (rucio==41.5.1, about 1-2 minutes)" >&2
  rm -rf "$VENV"
  $py -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # psycopg pins: those of rucio[postgresql] 41.5.1.
  "$VENV/bin/python" -m pip install --quiet 'rucio==41.5.1' gunicorn \
    'psycopg[binary]<=3.2.13' 'psycopg-pool<=3.2.8'
  touch "$VENV/.installed"
}

verb="${1:-}"
case "$verb" in
  venv) ensure_venv ;;
  start|stop|env|status|add-vo)
    ensure_venv
    exec "$VENV/bin/python" "$HERE/launcher.py" "$@" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
