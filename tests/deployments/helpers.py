"""What the deployment tests share: the environment a client of a scripted server runs in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def client_env(home: Path) -> dict[str, str]:
    """This process's environment plus the server's ``env.sh`` exports, the venv first on PATH."""
    env = dict(os.environ)
    for line in (home / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value.strip("'\"")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env
