"""Fixtures of the backend tests: a real local Rucio (``scripts/rucio_local``), started once.

The session fixture `local_rucio` starts PostgreSQL, the Rucio 41.5.1 server and its daemons
(building ``.venv-rucio`` first if needed, about 1-2 minutes the first time) and stops them at the
end. Each test then takes a fresh VO (`LocalRucio.new_vo`): Rucio runs in multi-VO mode, a VO is
an isolated namespace (RSEs, scopes, DIDs, rules), so every test starts from an empty catalog as
the embedded catalog's tests do, for a fraction of a second instead of a server start.

``DRP_RUCIO_WORKDIR=DIR`` reuses (or starts and keeps) an instance in DIR across sessions.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drp_campaign.backends.interfaces import DataCatalog, RuleState
from drp_campaign.backends.rucio import RucioSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rucio_local" / "rucio-local.sh"

_ALNUM = string.digits + string.ascii_lowercase


@dataclass
class LocalRucio:
    """A running local Rucio: its settings file and helpers to wait for its daemons."""

    workdir: Path
    settings: dict[str, Any]
    _tags: Iterator[str] = field(
        default_factory=lambda: (f"t{a}{b}" for a, b in itertools.product(_ALNUM, repeat=2))
    )

    def new_vo(self) -> str:
        """Create a fresh VO (namespace) and return its tag."""
        vo = next(self._tags)
        cmd = ["bash", str(SCRIPT), "add-vo", str(self.workdir), vo]
        subprocess.run(cmd, check=True, timeout=60)
        return vo

    def client_settings(self, vo: str) -> RucioSettings:
        """Settings for the ``root`` account of ``vo``, with a private token cache."""
        c = self.settings["client"]
        return RucioSettings.from_mapping({**c, "vo": vo})

    def daemon_loop(self) -> int:
        """Number of complete daemon passes so far."""
        status = json.loads(Path(self.settings["daemons_status"]).read_text())
        pid = int(status["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(
                f"the Rucio daemons (pid {pid}) died: see {self.workdir}/logs"
            ) from None
        return int(status["loop"])

    def _wait_loop(self, after: int, deadline: float) -> int:
        while (loop := self.daemon_loop()) <= after:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no daemon pass completed after pass {after}")
            time.sleep(0.05)
        return loop

    def settle(self, catalog: DataCatalog, timeout: float = 240.0) -> None:
        """Wait until the catalog's rules stop progressing.

        Done when no rule is REPLICATING and two complete daemon passes, both started after the
        rules were last seen to change, changed nothing: one pass might have begun before the
        change, the second surely saw it (late attachments, repairs, chained sources waiting).

        Parameters
        ----------
        catalog : `DataCatalog`
            The catalog whose rules to watch.
        timeout : `float`
            Seconds before giving up with `TimeoutError`.
        """
        deadline = time.monotonic() + timeout
        snapshot: object = None
        mark = 0
        while True:
            rules = catalog.list_rules()
            loop = self.daemon_loop()
            now = tuple(
                (r.id, r.state, r.locks_ok, r.locks_replicating, r.locks_stuck) for r in rules
            )
            if now != snapshot or any(r.state == RuleState.REPLICATING for r in rules):
                snapshot, mark = now, loop
            elif loop >= mark + 2:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rules still progressing after {timeout:.0f} s: {rules}")
            self._wait_loop(loop, deadline)


def _prerequisites() -> str | None:
    """Why a local Rucio cannot run here, if it cannot."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "no PostgreSQL server binaries under /usr/lib/postgresql"
    venv = ROOT / ".venv-rucio" / ".installed"
    if not venv.exists() and shutil.which("python3.11") is None and shutil.which("pyenv") is None:
        return "no Python 3.11 to build .venv-rucio"
    return None


@pytest.fixture(scope="session")
def local_rucio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRucio]:
    """A local Rucio for the whole session (stopped at the end unless DRP_RUCIO_WORKDIR)."""
    why = _prerequisites()
    if why:
        pytest.skip(f"cannot run a local Rucio: {why}")
    keep = os.environ.get("DRP_RUCIO_WORKDIR")
    workdir = Path(keep) if keep else tmp_path_factory.mktemp("rucio")
    subprocess.run(["bash", str(SCRIPT), "start", str(workdir)], check=True, timeout=900)
    settings = json.loads((workdir / "rucio-local.json").read_text())
    try:
        yield LocalRucio(workdir, settings)
    finally:
        if not keep:
            subprocess.run(["bash", str(SCRIPT), "stop", str(workdir)], check=False, timeout=120)
