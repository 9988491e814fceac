"""scripts/prefect_server.py: a real server on 127.0.0.1, auth enforced, stopped without residue."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
from pathlib import Path

import httpx
import pytest

from .conftest import Server, load_script, run_script


def _basic(auth_string: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if int(port_hex, 16) == port and state == "0A":  # 0A = LISTEN
                found.add(address)
    return found


def test_auth_is_enforced(prefect_server: Server) -> None:
    api = prefect_server.api_url
    # Health needs no auth (so does our readiness wait); everything else does.
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200
    no_auth = httpx.post(f"{api}/block_types/filter", json={}, timeout=10)
    assert no_auth.status_code == 401
    wrong = httpx.post(
        f"{api}/block_types/filter", json={}, headers=_basic("drp-test:wrong"), timeout=10
    )
    assert wrong.status_code == 401
    right = httpx.post(
        f"{api}/block_types/filter",
        json={},
        headers=_basic(prefect_server.auth_string),
        timeout=10,
    )
    assert right.status_code == 200


def test_state_files_and_loopback_only(prefect_server: Server) -> None:
    home = prefect_server.home
    state = json.loads((home / "server.json").read_text())
    assert state["pid"] == prefect_server.pid
    assert state["api_url"] == f"http://127.0.0.1:{state['port']}/api"
    assert state["auth"] is True
    assert prefect_server.auth_string not in (home / "server.json").read_text()
    env = (home / "env.sh").read_text()
    assert f"export PREFECT_API_URL={prefect_server.api_url}\n" in env
    assert f"export PREFECT_API_AUTH_STRING={prefect_server.auth_string}\n" in env
    assert stat.S_IMODE(os.stat(home / "env.sh").st_mode) == 0o600
    # The database (block documents and the key that decrypts them) is private.
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "prefect.db").st_mode) & 0o077 == 0
    # Listening on 127.0.0.1 only (0100007F in /proc's little-endian hex).
    assert _listen_addresses(prefect_server.port) == {"0100007F"}
    status = run_script("status", "--home", str(home))
    assert status.returncode == 0
    assert json.loads(status.stdout)["healthy"] is True
    assert prefect_server.auth_string not in status.stdout


def test_lifecycle_without_auth(tmp_path: Path) -> None:
    script = load_script()
    home = tmp_path / "home"
    port = script.free_port()
    started = run_script("start", "--home", str(home), "--port", str(port))
    assert started.returncode == 0, started.stderr
    state = json.loads((home / "server.json").read_text())
    pid = state["pid"]
    try:
        assert state["port"] == port and state["auth"] is False
        assert os.getpgid(pid) == pid  # its own process group, so stop can signal all of it
        env = (home / "env.sh").read_text()
        assert "PREFECT_API_URL=" in env and "AUTH" not in env
        # Without auth the API answers anyone on the loopback interface.
        api = state["api_url"]
        assert httpx.post(f"{api}/block_types/filter", json={}, timeout=10).status_code == 200
        assert (home / "prefect.db").is_file()
        again = run_script("start", "--home", str(home))
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        stopped = run_script("stop", "--home", str(home))
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert script.group_members(pid) == []
    assert not (home / "server.json").exists() and not (home / "env.sh").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api}/health", timeout=5)
    status = run_script("status", "--home", str(home))
    assert status.returncode == 1 and json.loads(status.stdout)["running"] is False
    assert run_script("stop", "--home", str(home)).stdout.startswith("no server running")


def test_start_fails_cleanly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script("start", "--home", str(tmp_path / "home"), "--port", str(port))
    assert result.returncode == 1
    assert "exited with code" in result.stderr and "server.log" in result.stderr
    assert not (tmp_path / "home" / "server.json").exists()


def test_bad_auth_string_refused(tmp_path: Path) -> None:
    result = run_script("start", "--home", str(tmp_path), "--auth-string", "no-colon")
    assert result.returncode == 1 and "USER:PASSWORD" in result.stderr
