"""What the campaign benchmarks (``orchestration.py``, ``resume.py``) share: the demo spec, the
CLI they run, and a read-only view of the ledger. Imported as a sibling module (a benchmark runs
as ``python benchmarks/NAME.py``, so this directory is on ``sys.path``)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
CLI = [sys.executable, "-m", "drp_campaign.cli"]

#: (step, site, stage, state, started, finished, attempts) of a ledger stage.
LedgerRow = tuple[str, str, str, str, float | None, float | None, int]


def demo_spec(directory: Path, visits: int) -> Path:
    """Write the demo spec with ``visits`` visits in ``directory`` (pipeline path absolute)."""
    text = DEMO.read_text()
    for old, new in (
        ("visits: 8}", f"visits: {visits}}}"),
        ("yaml: pipelines/", f"yaml: {ROOT}/pipelines/"),  # the path is relative to the spec
    ):
        if old not in text:  # the demo spec changed shape: fail loudly, not on another spec
            raise RuntimeError(f"{DEMO} no longer contains {old!r}")
        text = text.replace(old, new)
    path = directory / f"spec-{visits}.yaml"
    path.write_text(text)
    return path


def seed_repos(spec: Path, workdir: Path) -> None:
    """Seed the embedded default's repositories of ``workdir`` (the observatory's part, not timed).

    Production starts from repositories that already hold the raws, so the benchmarks time the
    campaign from there too.
    """
    done = subprocess.run(
        [*CLI, "seed", str(spec), "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"drp-campaign seed failed (exit {done.returncode}):\n{done.stderr}")


def load_average() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def ledger_rows(workdir: Path) -> list[LedgerRow]:
    """(step, site, stage, state, started, finished, attempts) of every stage, read-only."""
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
            return list(
                c.execute(
                    "SELECT step, site, stage, state, started, finished, attempts FROM stages "
                    "ORDER BY seq"
                )
            )
    except sqlite3.OperationalError:  # the ledger is being created
        return []


def rounded(value: Any, small: int, large: int) -> Any:
    """``value`` with every float rounded: to ``small`` digits below 10, else to ``large``."""
    if isinstance(value, float):
        return round(value, small) if abs(value) < 10 else round(value, large)
    if isinstance(value, dict):
        return {k: rounded(v, small, large) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, small, large) for v in value]
    return value
