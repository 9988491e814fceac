"""What the campaign benchmarks (``orchestration.py``, ``resume.py``, ``full_campaign.py``)
share: the demo spec, the CLI they run and how its process is timed, a local Prefect server and
the runs it recorded, and a read-only view of the ledger. Imported as a sibling module (a
benchmark runs as ``python benchmarks/NAME.py``, so this directory is on ``sys.path``)."""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
CLI = [sys.executable, "-m", "drp_campaign.cli"]
SERVER = [sys.executable, str(ROOT / "scripts" / "prefect_server.py")]

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


def ledger_records(workdir: Path) -> list[dict[str, Any]]:
    """Every row of the ledger's ``stages`` table as a dict, ``figures`` parsed, read-only.

    Whatever the table's columns are (a group column ``grp`` or not), all of them are returned.
    """
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
        c.row_factory = sqlite3.Row
        rows = [dict(r) for r in c.execute("SELECT * FROM stages ORDER BY seq")]
    for row in rows:
        row["figures"] = json.loads(row.get("figures") or "{}")
    return rows


# ----------------------------------------------------------------------------------------------
# Running the CLI


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every core, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    ticks = [int(f) for f in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped descendants (the runs and their Dask workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    """One ``drp-campaign`` process: exit status, times, and the CPU it and the machine used."""

    rc: int
    wall_s: float
    started: float  # epoch seconds, to compare with the ledger's times
    ended: float
    cpu_s: float  # the process tree's CPU seconds
    busy_s: float  # the whole machine's busy CPU seconds over the same interval


def run_cli(
    args: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    on_start: Callable[[int], object] | None = None,
) -> Run:
    """Run ``drp-campaign ARGS`` to the end (output appended to ``log``).

    ``on_start(pid)`` is called as soon as the process exists (e.g. to sample its memory).
    """
    cpu0, busy0 = children_cpu_s(), cpu_busy_s()
    started = time.time()
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ drp-campaign {shlex.join(args)}\n")
        out.flush()
        # Its own session, so that an interrupted benchmark can stop the run and its workers.
        proc = subprocess.Popen(
            [*CLI, *args], cwd=ROOT, stdout=out, stderr=out, env=env, start_new_session=True
        )
        try:
            if on_start is not None:
                on_start(proc.pid)
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    return Run(rc, wall, started, time.time(), children_cpu_s() - cpu0, cpu_busy_s() - busy0)


def log_tail(log: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------
# The Prefect server


def read_env_sh(path: Path) -> dict[str, str]:
    """The variables ``scripts/prefect_server.py`` exports in ``env.sh``."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


@dataclass(frozen=True)
class PrefectServer:
    """A local server started by `prefect_server`."""

    pid: int
    start_s: float  # from the start command until the server answered healthy
    client_env: dict[str, str]  # what ``env.sh`` exports: the API URL, no tracking

    @property
    def api_url(self) -> str:
        """The server's API."""
        return self.client_env["PREFECT_API_URL"]

    @property
    def env(self) -> dict[str, str]:
        """This process's environment pointed at the server, for a client process."""
        return {**os.environ, **self.client_env}


@contextmanager
def prefect_server(home: Path) -> Iterator[PrefectServer]:
    """A real Prefect server with its home (and SQLite database) in ``home``, always stopped."""
    t0 = time.perf_counter()
    started = subprocess.run(
        [*SERVER, "start", "--home", str(home)], cwd=ROOT, capture_output=True, text=True
    )
    start_s = time.perf_counter() - t0
    try:
        if started.returncode != 0:
            raise RuntimeError(f"the Prefect server did not start:\n{started.stderr}")
        pid = int(json.loads((home / "server.json").read_text())["pid"])
        yield PrefectServer(pid, start_s, read_env_sh(home / "env.sh"))
    finally:
        subprocess.run([*SERVER, "stop", "--home", str(home)], cwd=ROOT, capture_output=True)


def server_cpu_s(pid: int) -> float:
    """CPU seconds of the server process and its descendants so far."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def prefect_counts(api_url: str) -> dict[str, Any]:
    """Task and flow runs the server recorded, by name, with their durations per stage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    page = 200  # the server's maximum page size
    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            n_tasks = int(client.request("POST", "/task_runs/count", json={}).json())
            n_flows = int(client.request("POST", "/flow_runs/count", json={}).json())
            flow_runs: list[Any] = []
            while len(flow_runs) < n_flows:
                flow_page = client.read_flow_runs(limit=page, offset=len(flow_runs))
                if not flow_page:
                    break
                flow_runs.extend(flow_page)
            task_runs: list[Any] = []
            while len(task_runs) < n_tasks:
                task_page = client.read_task_runs(limit=page, offset=len(task_runs))
                if not task_page:
                    break
                task_runs.extend(task_page)
            flow_ids = list({fr.flow_id for fr in flow_runs})
            flows = client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=flow_ids)))
    flow_names = {f.id: f.name for f in flows}
    flows_by_name = Counter(flow_names.get(fr.flow_id, "?") for fr in flow_runs)
    # A subflow call is also recorded as a task run of its parent flow, named
    # "<flow name>-<dynamic key>"; a stage's task run is "<stage> <step>@<site>"
    # (flows/campaign.py), the others "plan ...", "setup <site>", "distribute ...", "verify ...".
    subflows = set(flow_names.values())
    tasks_by_name: Counter[str] = Counter()
    task_s: dict[str, float] = {}
    for tr in task_runs:
        base, _, key = tr.name.rpartition("-")
        if base in subflows and key == tr.dynamic_key:
            kind = f"subflow {base}"
        else:
            kind = tr.name.split()[0] if tr.name else "?"
        tasks_by_name[kind] += 1
        if tr.start_time is not None and tr.end_time is not None:
            task_s[kind] = task_s.get(kind, 0.0) + (tr.end_time - tr.start_time).total_seconds()
    states = Counter(str(r.state_type.value) if r.state_type else "?" for r in task_runs)
    return {
        "prefect_tasks": n_tasks,
        "prefect_flows": n_flows,
        "prefect_tasks_by_name": dict(sorted(tasks_by_name.items())),
        "prefect_flows_by_name": dict(sorted(flows_by_name.items())),
        "prefect_task_states": dict(states),
        "prefect_task_s": {k: round(v, 2) for k, v in sorted(task_s.items())},
    }
