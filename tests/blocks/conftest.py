"""A real ``prefect server start`` on 127.0.0.1 for the block tests, once per session.

Started with ``scripts/prefect_server.py`` (the script under test) with API authentication on,
as ``make serve`` runs it: ~10-30 s here, paid once.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "prefect_server.py"


def load_script() -> ModuleType:
    """The server script as a module (for its /proc helpers)."""
    spec = importlib.util.spec_from_file_location("prefect_server_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the server script as ``make`` does."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Server:
    home: Path
    api_url: str
    port: int
    pid: int
    auth_string: str


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with API auth; stopped (and checked gone) at the end of the session."""
    base = tmp_path_factory.mktemp("prefect-server")
    home = base / "home"
    auth_string = f"drp-test:{secrets.token_urlsafe(18)}"
    auth_file = base / "auth"
    auth_file.write_text(auth_string + "\n")
    auth_file.chmod(0o600)
    result = run_script("start", "--home", str(home), "--auth-string-file", str(auth_file))
    assert result.returncode == 0, result.stderr
    state = json.loads((home / "server.json").read_text())
    try:
        yield Server(home, state["api_url"], state["port"], state["pid"], auth_string)
    finally:
        stopped = run_script("stop", "--home", str(home))
        assert stopped.returncode == 0, stopped.stderr
        assert load_script().group_members(state["pid"]) == []


@pytest.fixture
def prefect_api(prefect_server: Server) -> Iterator[Server]:
    """Point this process's Prefect client at the session server, with its auth string."""
    with temporary_settings(
        updates={
            PREFECT_API_URL: prefect_server.api_url,
            PREFECT_API_AUTH_STRING: prefect_server.auth_string,
        }
    ):
        yield prefect_server
