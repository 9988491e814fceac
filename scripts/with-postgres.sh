#!/usr/bin/env bash
# Run a command with a throw-away PostgreSQL server on 127.0.0.1, then stop it whatever happens.
#
#   scripts/with-postgres.sh CMD [ARGS...]
#
# The command sees DRP_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:PORT/drp_test. The server
# lives in a fresh temporary directory, listens only on loopback, and runs with fsync off (tests).
# initdb and postgres refuse to run as root, so as root they run as the `postgres` OS user.
# Missing binaries are installed from Debian's packages (postgresql) when we are root.
set -euo pipefail

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
PGBIN="$(find_bin || true)"
if [ -z "$PGBIN" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "with-postgres: installing PostgreSQL server binaries (apt-get install postgresql)" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    PGBIN="$(find_bin)"
  else
    echo "with-postgres: no PostgreSQL server binaries (install the 'postgresql' package)" >&2
    exit 1
  fi
fi

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

DIR="$(mktemp -d /tmp/drp-pg.XXXXXX)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres -A trust --no-sync >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null
as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres drp_test
# The Butler PostgreSQL registry needs btree_gist (timespan exclusion constraints).
as_pg "$PGBIN/psql" -q -h 127.0.0.1 -p "$PORT" -U postgres -d drp_test -c "CREATE EXTENSION IF NOT EXISTS btree_gist" >/dev/null

export DRP_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PORT/drp_test"
echo "with-postgres: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT" >&2
set +e
"$@"
rc=$?
exit $rc
