"""A real Rucio 41.5.1 on 127.0.0.1 for tests and demos: PostgreSQL, server, daemons.

    python launcher.py start  WORKDIR   # idempotent: reuses a running instance
    python launcher.py stop   WORKDIR   # kills what start started, by PID
    python launcher.py env    WORKDIR   # shell exports to reach it
    python launcher.py status WORKDIR   # exit 0 iff it answers
    python launcher.py add-vo WORKDIR VO  # a fresh namespace (see below)

Normally run through ``rucio-local.sh``, which first builds ``.venv-rucio`` (Python 3.11 with
``rucio==41.5.1``, gunicorn and psycopg): the Rucio server's pins (SQLAlchemy, urllib3) clash with
the project's, so it lives in its own environment; the project only needs ``rucio-clients``.

``start`` does, once per WORKDIR:

1. PostgreSQL 15 (SQLite cannot store the JSON DID metadata lsst-rucio-register attaches) as the
   ``postgres`` OS user when run as root (initdb refuses root), on a free loopback port, with its
   data in a private ``/tmp/drp-rucio-pg.*`` directory (WORKDIR may sit under a 0700 directory
   the ``postgres`` user cannot enter), fsync off;
2. ``WORKDIR/etc/rucio.cfg`` and ``alembic.ini``; the schema, the base VO and the root account
   (a random password for the ``userpass`` identity);
3. the server: gunicorn running Rucio's Flask application (through `wsgi.py`, which fixes the
   multi-VO schema's parsing of DID names containing ``/``) on a free port;
4. the daemons: one process (`daemons.py`) running judge-evaluator, judge-repairer and the
   conveyor with our verifying ``local`` transfertool (`local_transfertool.py`).

Rucio runs in multi-VO mode: each VO is a separate namespace (its own RSEs, scopes, accounts and
DIDs), so tests get a fresh, isolated catalog per test from one server with ``add-vo`` (the VO's
``root`` account accepts the same userpass identity). ``start`` creates the VO ``drp`` for demos.

Everything it needs to reach the instance is written to ``WORKDIR/rucio-local.json`` (mode 0600):
the client settings (``host``, ``auth_host``, ``account``, ``vo``, ``auth_type``, ``username``,
``password``), the super-root credentials, ports, PIDs and the daemon status file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS = "rucio-local.json"
DEMO_VO = "drp"
USERNAME = "drp"


def _pg_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise SystemExit("rucio-local: no PostgreSQL server binaries under /usr/lib/postgresql")
    return candidates[-1].parent


def _as_pg(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    # initdb and postgres refuse to run as root.
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state != "Z"


def _ping(host: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(f"{host}/ping", timeout=timeout) as r:
            return str(json.loads(r.read())["version"])
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return None


def load_settings(workdir: Path) -> dict[str, Any]:
    """The settings ``start`` wrote (raises FileNotFoundError if it never ran)."""
    return dict(json.loads((workdir / SETTINGS).read_text()))


def _save_settings(workdir: Path, settings: dict[str, Any]) -> None:
    path = workdir / SETTINGS
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)


def _rucio_cfg(workdir: Path, db_url: str, password: str) -> str:
    return f"""\
[common]
logdir = {workdir / "logs"}
loglevel = WARNING
multi_vo = True

[database]
default = {db_url}
pool_size = 20
max_overflow = 20
pool_reset_on_return = rollback
echo = False

[bootstrap]
userpass_identity = {USERNAME}
userpass_pwd = {password}
userpass_email = drp@localhost
x509_identity =
gss_identity =
ssh_identity =

[alembic]
cfg = {workdir / "etc" / "alembic.ini"}

[policy]
permission = generic
schema = generic
lfn2pfn_algorithm_default = identity

[conveyor]
scheme = file
transfertool = local
use_preparer = False

[repairer]
# As in production: STUCK rules are retried after 30 min, or at once when boosted
# (RucioCatalog.repair); rules waiting for a chained source are re-checked every pass.
updated_at_delta = 1800

[transfers]
# No multihop (every RSE pair has a distance); an empty expression also silences a warning.
multihop_rse_expression =

[monitor]
enable_metrics = False

[api]
# Multi-VO administration (add-vo) is not among the default REST endpoints.
endpoints_add = vos
"""


def _alembic_ini(db_url: str) -> str:
    import rucio  # noqa: PLC0415 -- only in the Rucio environment

    repo = Path(rucio.__file__).parent / "db" / "sqla" / "migrate_repo"
    return f"""\
[alembic]
script_location = {repo}
sqlalchemy.url = {db_url}

[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""


_BOOTSTRAP = """
from rucio.db.sqla.util import build_database, create_base_vo, create_root_account
build_database()
create_base_vo()
create_root_account()
"""


def _start_postgres(workdir: Path, settings: dict[str, Any]) -> None:
    pgbin = _pg_bin()
    pg_dir = Path(tempfile.mkdtemp(prefix="drp-rucio-pg."))
    if os.geteuid() == 0:
        shutil.chown(pg_dir, "postgres")
    port = _free_port()
    settings.update(pg_dir=str(pg_dir), pg_port=port, pg_bin=str(pgbin))
    _save_settings(workdir, settings)  # so that stop can clean up even if what follows fails
    _as_pg([str(pgbin / "initdb"), "-D", f"{pg_dir}/data", "-U", "postgres", "-A", "trust",
            "--no-sync"])  # fmt: skip
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {pg_dir} -c fsync=off "
        "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200"
    )
    _as_pg([str(pgbin / "pg_ctl"), "-D", f"{pg_dir}/data", "-l", f"{pg_dir}/server.log", "-w",
            "-t", "60", "-o", options, "start"])  # fmt: skip
    _as_pg([str(pgbin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            "rucio"])  # fmt: skip


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # our own process group: stop kills it whole
        )  # fmt: skip
    return proc.pid


def _wait(what: str, ready: Any, pid: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not _alive(pid):
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise SystemExit(f"rucio-local: {what} died; end of {log}:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"rucio-local: {what} not ready after {timeout:.0f} s (see {log})")
        time.sleep(0.2)


def add_vo(settings: dict[str, Any], vo: str) -> None:
    """Create a VO (a fresh namespace) through the REST API, as super_root."""
    host = settings["host"]
    headers = {
        "X-Rucio-Account": "super_root",
        "X-Rucio-VO": "def",
        "X-Rucio-Username": settings["username"],
        "X-Rucio-Password": settings["password"],
    }
    req = urllib.request.Request(f"{host}/auth/userpass", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        token = r.headers["X-Rucio-Auth-Token"]
    body = json.dumps({"description": f"drp-campaign {vo}", "email": "drp@localhost"}).encode()
    req = urllib.request.Request(
        f"{host}/vos/{vo}", data=body, method="POST",
        headers={"X-Rucio-Auth-Token": token, "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        urllib.request.urlopen(req, timeout=30).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # already exists: fine
            raise SystemExit(f"rucio-local: cannot add VO {vo}: {exc} {exc.read()!r}") from None


def start(workdir: Path) -> dict[str, Any]:
    """Start everything (or find it running); return the settings."""
    workdir = workdir.resolve()
    try:
        settings = load_settings(workdir)
    except FileNotFoundError:
        settings = {}
    running = settings.get("host") and _ping(settings["host"])
    if running and "client" in settings and _alive(settings.get("pids", {}).get("daemons")):
        return settings
    if settings:
        stop(workdir)  # half-dead: start afresh
    for sub in ("etc", "logs", "transfers"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    password = secrets.token_urlsafe(18)
    settings = {"workdir": str(workdir), "username": USERNAME, "password": password, "pids": {}}
    _start_postgres(workdir, settings)
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:{settings['pg_port']}/rucio"
    cfg = workdir / "etc" / "rucio.cfg"
    cfg.write_text(_rucio_cfg(workdir, db_url, password))
    cfg.chmod(0o600)
    (workdir / "etc" / "alembic.ini").write_text(_alembic_ini(db_url))
    env = {**os.environ, "RUCIO_CONFIG": str(cfg), "PYTHONUNBUFFERED": "1"}
    env.pop("RUCIO_HOME", None)
    subprocess.run([sys.executable, "-c", _BOOTSTRAP], check=True, env=env,
                   capture_output=True, text=True)  # fmt: skip

    port = _free_port()
    host = f"http://127.0.0.1:{port}"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    server_log = workdir / "logs" / "server.log"
    settings["pids"]["server"] = _spawn(
        [str(gunicorn), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
         "--timeout", "300", "--chdir", str(HERE), "wsgi:application"],
        server_log, env,
    )  # fmt: skip
    settings.update(host=host, server_port=port, config=str(cfg))
    _save_settings(workdir, settings)
    _wait("the Rucio server", lambda: _ping(host) is not None, settings["pids"]["server"],
          server_log, 120)  # fmt: skip

    status = workdir / "daemons.json"
    status.unlink(missing_ok=True)
    denv = {**env, "DRP_RUCIO_TRANSFER_STATE": str(workdir / "transfers")}
    daemons_log = workdir / "logs" / "daemons.log"
    settings["pids"]["daemons"] = _spawn(
        [sys.executable, str(HERE / "daemons.py"), "--status", str(status)], daemons_log, denv
    )
    settings["daemons_status"] = str(status)
    _save_settings(workdir, settings)
    _wait("the Rucio daemons", status.exists, settings["pids"]["daemons"], daemons_log, 120)

    add_vo(settings, DEMO_VO)
    settings["client"] = {
        "host": host, "auth_host": host, "account": "root", "vo": DEMO_VO,
        "auth_type": "userpass", "username": USERNAME, "password": password,
    }  # fmt: skip
    # For the `rucio` command line: RUCIO_CONFIG=WORKDIR/etc/rucio-client.cfg (see `env`).
    client_cfg = workdir / "etc" / "rucio-client.cfg"
    keys = {"host": "rucio_host"}  # the only key whose name differs in rucio.cfg
    client_cfg.write_text(
        "[client]\n" + "".join(f"{keys.get(k, k)} = {v}\n" for k, v in settings["client"].items())
    )
    client_cfg.chmod(0o600)
    settings["version"] = _ping(host)
    settings["started_in_s"] = round(time.monotonic() - t0, 1)
    _save_settings(workdir, settings)
    return settings


def _ours(pid: int, marker: str) -> bool:
    """Whether ``pid`` still runs what ``start`` spawned (its command line has ``marker``), so a
    PID recycled by an unrelated process is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _kill(pid: int, marker: str, timeout: float = 15.0) -> None:
    """SIGTERM the process group ``start`` created for ``pid``, then SIGKILL it."""
    if not _ours(pid, marker):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            return


def stop(workdir: Path) -> None:
    """Stop the daemons, the server and PostgreSQL started for ``workdir``."""
    workdir = workdir.resolve()
    try:
        settings = load_settings(workdir)
    except FileNotFoundError:
        return
    markers = {"daemons": str(HERE / "daemons.py"), "server": "wsgi:application"}
    for name, marker in markers.items():
        pid = settings.get("pids", {}).get(name)
        if pid:
            _kill(int(pid), marker)
    pg_dir = settings.get("pg_dir")
    if pg_dir and Path(pg_dir).exists():
        pg_ctl = Path(settings.get("pg_bin") or _pg_bin()) / "pg_ctl"
        try:
            _as_pg([str(pg_ctl), "-D", f"{pg_dir}/data", "-m", "immediate", "stop"])
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(pg_dir, ignore_errors=True)
    (workdir / SETTINGS).unlink()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("verb", choices=["start", "stop", "env", "status", "add-vo"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("vo", nargs="?", help="add-vo: a 3-character VO tag")
    args = parser.parse_args(argv)
    if args.verb == "start":
        s = start(args.workdir)
        print(f"rucio-local: Rucio {s['version']} at {s['host']} (VO {DEMO_VO}); "
              f"settings in {args.workdir.resolve() / SETTINGS}")  # fmt: skip
    elif args.verb == "stop":
        stop(args.workdir)
    elif args.verb == "status":
        try:
            s = load_settings(args.workdir.resolve())
        except FileNotFoundError:
            return 1
        return 0 if _ping(s["host"]) and _alive(s.get("pids", {}).get("daemons")) else 1
    elif args.verb == "env":
        s = load_settings(args.workdir.resolve())
        c = s["client"]
        print(f"export DRP_RUCIO_SETTINGS={args.workdir.resolve() / SETTINGS}")
        print(f"export RUCIO_CONFIG={args.workdir.resolve() / 'etc' / 'rucio-client.cfg'}")
        print(f"export RUCIO_ACCOUNT={c['account']} RUCIO_VO={c['vo']}")
    elif args.verb == "add-vo":
        if not args.vo or len(args.vo) != 3:
            parser.error("add-vo needs a 3-character VO tag")
        add_vo(load_settings(args.workdir.resolve()), args.vo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
