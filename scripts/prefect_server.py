#!/usr/bin/env python3
"""Start, check and stop a local Prefect server whose home is a work directory.

    python scripts/prefect_server.py start --home DIR [--port P] [--auth-string USER:PASS |
                                           --auth-string-file FILE | --generate-auth]
    python scripts/prefect_server.py status --home DIR
    python scripts/prefect_server.py stop --home DIR

Why a real server: Prefect's ephemeral mode was seen to lose run records at exit and to fail with
Dask worker processes (DESIGN.md section 8); ``prefect server start`` keeps every record and is
ready in 8-27 s on these machines.

``start`` runs ``prefect server start --host 127.0.0.1`` in its own process group with
``PREFECT_HOME=DIR`` (so its SQLite database is ``DIR/prefect.db``), analytics off, output in
``DIR/server.log``. It waits for ``/api/health`` with a deadline, then writes ``DIR/server.json``
(pid, port, api_url, ui_url, whether auth is on; never the auth string) and ``DIR/env.sh``
(mode 0600) to source in client shells: ``PREFECT_API_URL``, ``DO_NOT_TRACK=1`` and, only when
auth was asked for, ``PREFECT_API_AUTH_STRING``.

With an auth string the server sets ``PREFECT_SERVER_API_AUTH_STRING`` and answers 401 to any
request without ``Authorization: Basic base64(USER:PASS)`` (clients send it when
``PREFECT_API_AUTH_STRING`` is set), except ``GET /api/health`` and ``/api/ready``. This matters
because the API returns Block secrets in clear to anyone asking with ``include_secrets``.
``--auth-string`` puts the secret on the command line, visible to every local user in the
process list; prefer ``--auth-string-file`` or ``--generate-auth`` (a random one, kept only in
``env.sh``).

``stop`` signals the whole process group (SIGTERM, then SIGKILL after a deadline) and waits for it
to be gone. Only the standard library is used, so the script starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # every listener on loopback only (DESIGN.md section 8)
STATE_FILE = "server.json"
ENV_FILE = "env.sh"
LOG_FILE = "server.log"
START_TIMEOUT = 180.0  # seconds; measured 8-27 s, with slack for a loaded 2-core machine
STOP_TIMEOUT = 30.0

# Inherited settings that would change which database or auth the server uses: the server we
# start is defined by its arguments only.
_CLEARED = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_PROFILES_PATH",
    "PREFECT_PROFILE",
)


class ServerError(RuntimeError):
    """The server could not be started, found or stopped."""


# ----------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether ``<api_url>/health`` answers 200 (it needs no auth)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it waits only for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return sorted(members)


def _is_our_server(pid: int) -> bool:
    """Guard against a recycled PID: the process must be a ``prefect server start``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc: cannot check, trust the state file
    return b"server" in cmdline and b"start" in cmdline and any(b"prefect" in a for a in cmdline)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, with no moment where it is readable by others."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # in case the file existed with a wider mode
    os.replace(tmp, path)


def read_state(home: Path) -> dict[str, Any] | None:
    """The state file of the server in ``home``, or ``None``."""
    try:
        return dict(json.loads((home / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None


def _prefect_command() -> list[str]:
    script = Path(sys.executable).with_name("prefect")
    if script.is_file():
        return [str(script)]
    found = shutil.which("prefect")
    if found:
        return [found]
    return [sys.executable, "-m", "prefect"]


def _log_tail(home: Path, lines: int = 30) -> str:
    try:
        text = (home / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _auth_string(args: argparse.Namespace) -> str | None:
    if args.generate_auth:
        return f"drp:{secrets.token_urlsafe(24)}"
    if args.auth_string_file is not None:
        value = Path(args.auth_string_file).read_text().strip()
    else:
        value = args.auth_string
    if value is not None and ":" not in value:
        raise ServerError("the auth string must be USER:PASSWORD")
    return str(value) if value is not None else None


# ----------------------------------------------------------------------------------------------
# Commands


def start(
    home: Path,
    port: int | None = None,
    auth_string: str | None = None,
    timeout: float = START_TIMEOUT,
) -> dict[str, Any]:
    """Start the server in the background and wait until it is healthy.

    Parameters
    ----------
    home : `pathlib.Path`
        PREFECT_HOME of the server; created if missing.
    port : `int`, optional
        TCP port on 127.0.0.1; a free one if not given.
    auth_string : `str`, optional
        ``USER:PASSWORD`` the API will require.
    timeout : `float`, optional
        Seconds to wait for ``/api/health``.

    Returns
    -------
    state : `dict`
        What ``server.json`` holds.

    Raises
    ------
    ServerError
        If a server already runs in ``home``, or this one exits or is not healthy in time (it
        is stopped then).
    """
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    # The database holds the block documents and, next to them, the key that decrypts them:
    # keep the whole home private to its owner.
    home.chmod(0o700)
    state = read_state(home)
    if state is not None and _alive(state["pid"]) and _is_our_server(state["pid"]):
        raise ServerError(
            f"a server already runs from {home} (pid {state['pid']}, {state['api_url']}); "
            f"stop it first"
        )
    port = port or free_port()
    api_url = f"http://{HOST}:{port}/api"
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        # The server's UI and internal clients talk to this very server.
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    if auth_string is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
        env["PREFECT_API_AUTH_STRING"] = auth_string  # for the server's own clients
    command = [
        *_prefect_command(),
        "server",
        "start",
        "--host",
        HOST,
        "--port",
        str(port),
        "--analytics-off",
    ]
    with open(home / LOG_FILE, "ab") as log:
        # A new session makes the server a process-group leader: stop signals the group, so
        # any process it spawns goes too, and Ctrl-C in the caller's terminal does not reach it.
        process = subprocess.Popen(
            command,
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,  # files the server creates (prefect.db, -wal, -shm) are private too
        )
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if process.poll() is not None:
            raise ServerError(
                f"the server exited with code {process.returncode} before it was ready; "
                f"{home / LOG_FILE} ends with:\n{_log_tail(home)}"
            )
        if time.monotonic() > deadline:
            _stop_group(process.pid)
            raise ServerError(
                f"the server was not healthy after {timeout:.0f} s and was stopped; "
                f"{home / LOG_FILE} ends with:\n{_log_tail(home)}"
            )
        time.sleep(0.25)
    state = {
        "pid": process.pid,
        "port": port,
        "api_url": api_url,
        "ui_url": f"http://{HOST}:{port}",
        "home": str(home),
        "auth": auth_string is not None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (home / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    lines = [
        f"# Prefect server started from {home}; source this file in client shells.",
        f"export PREFECT_API_URL={shlex.quote(api_url)}",
        "export DO_NOT_TRACK=1",
    ]
    if auth_string is not None:
        lines.append(f"export PREFECT_API_AUTH_STRING={shlex.quote(auth_string)}")
    _write_private(home / ENV_FILE, "\n".join(lines) + "\n")
    return state


def _stop_group(pgid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout``, wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pgid) and not group_members(pgid):
                return
            time.sleep(0.1)
    if _alive(pgid) or group_members(pgid):
        raise ServerError(f"process group {pgid} still runs after SIGKILL")


def stop(home: Path, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the server started from ``home``.

    Parameters
    ----------
    home : `pathlib.Path`
        The server's home.
    timeout : `float`, optional
        Seconds to wait after SIGTERM before SIGKILL.

    Returns
    -------
    stopped : `bool`
        ``False`` if no server was running.
    """
    home = home.expanduser().resolve()
    state = read_state(home)
    if state is None:
        return False
    pid = int(state["pid"])
    running = _alive(pid) and _is_our_server(pid)
    if running:
        _stop_group(pid, timeout)
    # The address is stale now; the database and the log stay for inspection.
    for name in (STATE_FILE, ENV_FILE):
        (home / name).unlink(missing_ok=True)
    return running


def status(home: Path) -> dict[str, Any]:
    """State of the server started from ``home``: ``server.json`` plus ``running`` and ``healthy``.

    Parameters
    ----------
    home : `pathlib.Path`
        The server's home.

    Returns
    -------
    status : `dict`
        ``{"running": False}`` when there is no state file.
    """
    home = home.expanduser().resolve()
    state = read_state(home)
    if state is None:
        return {"running": False, "healthy": False, "home": str(home)}
    running = _alive(state["pid"]) and _is_our_server(state["pid"])
    return {**state, "running": running, "healthy": running and healthy(state["api_url"])}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    p_start = commands.add_parser("start", help="start a server in the background")
    p_start.add_argument("--home", type=Path, required=True, help="PREFECT_HOME of the server")
    p_start.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p_start.add_argument("--timeout", type=float, default=START_TIMEOUT, help="seconds to wait")
    auth = p_start.add_mutually_exclusive_group()
    auth.add_argument("--auth-string", default=None, help="USER:PASSWORD the API requires")
    auth.add_argument("--auth-string-file", type=Path, default=None, help="file holding it")
    auth.add_argument("--generate-auth", action="store_true", help="generate a random one")
    for name, text in (("status", "show the server's state"), ("stop", "stop the server")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--home", type=Path, required=True, help="PREFECT_HOME of the server")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            state = start(args.home, args.port, _auth_string(args), args.timeout)
            print(
                f"Prefect server pid {state['pid']} at {state['ui_url']} "
                f"(API auth {'on' if state['auth'] else 'off'}); "
                f"use it with: source {Path(state['home']) / ENV_FILE}"
            )
            return 0
        if args.command == "stop":
            stopped = stop(args.home)
            print("stopped" if stopped else f"no server running from {args.home}")
            return 0
        info = status(args.home)
        print(json.dumps(info, indent=2))
        return 0 if info["healthy"] else 1
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
