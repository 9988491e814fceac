"""Shared helpers of the campaign benchmarks: a scaled demo spec, runs of the CLI, the ledger."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
CLI = [sys.executable, "-m", "drp_campaign.cli"]


def demo_spec(directory: Path, visits: int) -> Path:
    """The demo spec with ``visits`` visits, written in ``directory`` (pipeline path absolute)."""
    text = DEMO.read_text().replace("visits: 8}", f"visits: {visits}}}")
    text = text.replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    path = directory / f"spec-{visits}.yaml"
    path.write_text(text)
    return path


def load_average() -> float:
    """The 1-minute load average (timings on a busy 2-core machine are not comparable)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def ledger_rows(workdir: Path) -> list[tuple[str, str, str, str, float | None, float | None]]:
    """(step, site, stage, state, started, finished) of every stage, read-only."""
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
            return list(c.execute("SELECT step, site, stage, state, started, finished FROM stages"))
    except sqlite3.OperationalError:  # the schema is being created
        return []


def run_cli(
    args: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    kill_when: Callable[[], bool] | None = None,
) -> tuple[int, float, float]:
    """Run ``drp-campaign ARGS``; SIGKILL its process group once ``kill_when()`` holds.

    Returns
    -------
    rc, wall_s, started : `int`, `float`, `float`
        Exit status (-9 when killed), wall time, and the epoch time it started.
    """
    started = time.time()
    t0 = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.Popen(
            [*CLI, *args], stdout=out, stderr=out, env=env, start_new_session=True
        )
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, 9)
                proc.wait()
                return -9, time.perf_counter() - t0, started
            time.sleep(0.05)
    return proc.returncode, time.perf_counter() - t0, started
