"""What Prefect costs: the demo campaign through the flows against the plain driver, same work.

The demo spec (``deployments/campaigns/dc2-test-med-1-demo.yaml``: LSSTComCam, 3 sites, 5 steps;
8 visits, 4 with ``--quick``) runs twice, each time in a fresh work directory and with
``--no-verify`` (the single-site reference is the same work either way and is left out):

1. the plain driver, ``drp-campaign run SPEC --no-prefect`` (no Prefect server, no flow);
2. the ``drp-campaign`` flow against a real local server started for the purpose by
   ``scripts/prefect_server.py`` (and always stopped afterwards), without Blocks (the embedded
   backends, as in the plain run).

Figures (JSON keys):

- ``driver_wall_s``: the plain driver's process, start to exit.
- ``campaign_wall_s``: the server's start until healthy plus the Prefect run's process, start to
  exit.
- ``prefect_start_s``: Prefect's fixed start, the part of ``campaign_wall_s`` that does not grow
  with the campaign: the server's start, plus how much later the Prefect process starts its
  first ledger stage than the plain driver does (see `fixed_start`).
- ``overhead_fraction``: ``(campaign_wall_s - prefect_start_s - driver_wall_s) / driver_wall_s``,
  what Prefect costs beyond its fixed start. Target: <= 0.05.
- ``prefect_tasks``, ``prefect_flows``: task runs and flow runs the server recorded (Prefect
  records a subflow call as a flow run *and* as a wrapper task run in its parent, counted in
  ``prefect_tasks``; ``prefect_tasks_by_name`` separates them).
- detail: the per-stage sums of both ledgers (``stage_s_plain``, ``stage_s_prefect``), each
  step's span (``step_span_s_*``), the Prefect task runs' own durations per stage
  (``prefect_task_s``), the start and end delays, CPU seconds of each process tree and of the
  server, the CPU other work took meanwhile, the load average before and after.

The machine is shared: when other work took CPU during a run, the output says so, and
``--repeats N`` runs both N times (alternating which goes first) and reports medians.

Usage: python benchmarks/orchestration.py [--quick] [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _campaign import (
    CLI,
    ROOT,
    LedgerRow,
    demo_spec,
    ledger_rows,
    load_average,
    rounded,
    seed_repos,
)

SERVER = [sys.executable, str(ROOT / "scripts" / "prefect_server.py")]
CORES = os.cpu_count() or 1
# Timings are flagged as noisy when other work averaged more than this many cores during a run.
FOREIGN_CPU_NOISY = 0.25

# ----------------------------------------------------------------------------------------------
# Helpers


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


def run_cli(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> Run:
    """Run ``drp-campaign ARGS`` to the end (output appended to ``log``)."""
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
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    return Run(rc, wall, started, time.time(), children_cpu_s() - cpu0, cpu_busy_s() - busy0)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------
# Ledger figures


def stage_sums(rows: list[LedgerRow]) -> dict[str, float]:
    """Seconds spent in each kind of stage, summed over every (step, site)."""
    sums: dict[str, float] = {}
    for _, _, stage, _, started, finished, _ in rows:
        if started is not None and finished is not None:
            sums[stage] = sums.get(stage, 0.0) + finished - started
    return {k: round(v, 2) for k, v in sums.items()}


def step_spans(rows: list[LedgerRow]) -> dict[str, float]:
    """Each step's wall time: its first stage's start to its last stage's end, any site."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for step, _site, stage, _, started, finished, _ in rows:
        key = stage if step == "*" else step  # campaign-wide stages under their own name
        if started is not None:
            first[key] = min(first.get(key, started), started)
        if finished is not None:
            last[key] = max(last.get(key, finished), finished)
    return {k: round(last[k] - first[k], 2) for k in first if k in last}


def start_and_end_delay(rows: list[LedgerRow], run: Run) -> tuple[float, float]:
    """Seconds from the process start to the first stage, and from the last stage to the exit."""
    starts = [r[4] for r in rows if r[4] is not None]
    ends = [r[5] for r in rows if r[5] is not None]
    if not starts or not ends:
        raise RuntimeError("the run left no stage in its ledger")
    return min(starts) - run.started, run.ended - max(ends)


def fixed_start(server_s: float, delay_prefect: float, delay_plain: float) -> float:
    """Prefect's fixed start: the server's start plus its run's extra delay to the first stage.

    Why this measure: both processes import the same modules (the CLI imports Prefect even for
    the plain driver, for its ``blocks`` sub-commands) and start the same two-worker Dask
    cluster before their first stage, so the difference between their delays to the first
    ledger stage is what the Prefect run adds before any work: the API client, the
    ``drp-campaign`` and ``drp-plan`` flow runs and the ``plan`` task run created on the server,
    the sites' Blocks looked up. It is measured on the same runs as the walls, unlike a
    separate trivial flow, which also pays the interpreter's start and Prefect's import that
    the plain driver pays too (``trivial_flow_s`` is reported as a cross-check). It does not
    depend on the campaign's size. Clamped at 0: on a busy machine the difference can be noise.
    """
    return server_s + max(delay_prefect - delay_plain, 0.0)


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


_NOOP_FLOW = """
from prefect import flow

@flow(name="bench-noop", persist_result=False)
def noop() -> None:
    pass

noop()
"""


def trivial_flow_s(env: Mapping[str, str]) -> tuple[float, float]:
    """Wall of a fresh process running a no-op flow, and of one that only imports Prefect."""

    def wall(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        return time.perf_counter() - t0

    return wall(_NOOP_FLOW), wall("import prefect")


# ----------------------------------------------------------------------------------------------
# One comparison


def run_plain(spec: Path, base: Path) -> dict[str, Any]:
    """The plain driver in ``base/plain``."""
    work, log = base / "plain", base / "plain.log"
    seed_repos(spec, work)
    run = run_cli(["run", str(spec), "--workdir", str(work), "--no-prefect", "--no-verify"], log)
    if run.rc != 0:
        raise RuntimeError(f"the plain driver failed (exit {run.rc}):\n{_tail(log)}")
    rows = ledger_rows(work)
    start, end = start_and_end_delay(rows, run)
    return {
        "wall_s": run.wall_s,
        "start_delay_s": start,
        "end_delay_s": end,
        "cpu_s": run.cpu_s,
        "foreign_cpu_cores": max(run.busy_s - run.cpu_s, 0.0) / run.wall_s,
        "stage_s": stage_sums(rows),
        "step_span_s": step_spans(rows),
        "stages": len(rows),
    }


def run_prefect(spec: Path, base: Path) -> dict[str, Any]:
    """A server in ``base/prefect/prefect``, the flow against it, the API's counts; stop it."""
    work, log = base / "prefect", base / "prefect.log"
    seed_repos(spec, work)
    home = work / "prefect"
    t0 = time.perf_counter()
    started = subprocess.run(
        [*SERVER, "start", "--home", str(home)], cwd=ROOT, capture_output=True, text=True
    )
    server_s = time.perf_counter() - t0
    try:
        if started.returncode != 0:
            raise RuntimeError(f"the Prefect server did not start:\n{started.stderr}")
        pid = int(json.loads((home / "server.json").read_text())["pid"])
        client_env = read_env_sh(home / "env.sh")
        env = {**os.environ, **client_env}
        server_cpu0 = server_cpu_s(pid)
        run = run_cli(["run", str(spec), "--workdir", str(work), "--no-verify"], log, env=env)
        server_cpu = server_cpu_s(pid) - server_cpu0
        if run.rc != 0:
            raise RuntimeError(f"the Prefect run failed (exit {run.rc}):\n{_tail(log)}")
        counts = prefect_counts(client_env["PREFECT_API_URL"])
        noop_s, import_s = trivial_flow_s(env)
    finally:
        subprocess.run([*SERVER, "stop", "--home", str(home)], cwd=ROOT, capture_output=True)
    rows = ledger_rows(work)
    start, end = start_and_end_delay(rows, run)
    return {
        "server_start_s": server_s,
        "wall_s": run.wall_s,
        "start_delay_s": start,
        "end_delay_s": end,
        "cpu_s": run.cpu_s,
        "server_cpu_s": server_cpu,
        "foreign_cpu_cores": max(run.busy_s - run.cpu_s - server_cpu, 0.0) / run.wall_s,
        "stage_s": stage_sums(rows),
        "step_span_s": step_spans(rows),
        "stages": len(rows),
        "trivial_flow_s": noop_s,
        "prefect_import_s": import_s,
        **counts,
    }


def compare(plain: Mapping[str, Any], flows: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of one plain run and one Prefect run."""
    driver = float(plain["wall_s"])
    campaign = flows["server_start_s"] + flows["wall_s"]
    start = fixed_start(flows["server_start_s"], flows["start_delay_s"], plain["start_delay_s"])
    # The end is fixed too (the report task, the flow run's completion, the exit flushing the
    # events and logs); reported apart, since the target is stated beyond the start alone.
    stop = max(flows["end_delay_s"] - plain["end_delay_s"], 0.0)
    return {
        "campaign_wall_s": campaign,
        "driver_wall_s": driver,
        "prefect_start_s": start,
        "overhead_fraction": (campaign - start - driver) / driver,
        "prefect_stop_s": stop,
        "overhead_fraction_beyond_start_and_stop": (campaign - start - stop - driver) / driver,
        # CPU seconds suffer less than walls from other work on the machine: a cross-check.
        "cpu_overhead_fraction": (flows["cpu_s"] + flows["server_cpu_s"] - plain["cpu_s"])
        / plain["cpu_s"],
    }


def measure(visits: int, repeats: int, keep: bool) -> dict[str, Any]:
    """Run the comparison ``repeats`` times; medians at the top, every repeat in ``rounds``."""
    load_before = load_average()
    base = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    ok = False
    try:
        spec = demo_spec(base, visits)
        rounds: list[dict[str, Any]] = []
        for i in range(repeats):
            where = base / f"r{i}"
            where.mkdir()
            # Alternate which goes first, so that a drift in the machine's load over the
            # benchmark does not always favour the same side.
            if i % 2 == 0:
                plain = run_plain(spec, where)
                print(f"[{i}] plain driver: {plain['wall_s']:.1f} s", flush=True)
                flows = run_prefect(spec, where)
                print(f"[{i}] Prefect run: {flows['wall_s']:.1f} s", flush=True)
            else:
                flows = run_prefect(spec, where)
                print(f"[{i}] Prefect run: {flows['wall_s']:.1f} s", flush=True)
                plain = run_plain(spec, where)
                print(f"[{i}] plain driver: {plain['wall_s']:.1f} s", flush=True)
            rounds.append({**compare(plain, flows), "plain": plain, "prefect": flows})
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"work directories and logs kept in {base}", file=sys.stderr)
    load_after = load_average()
    headline = {
        k: statistics.median(float(r[k]) for r in rounds)
        for k in (
            "campaign_wall_s",
            "driver_wall_s",
            "prefect_start_s",
            "overhead_fraction",
            "prefect_stop_s",
            "overhead_fraction_beyond_start_and_stop",
            "cpu_overhead_fraction",
        )
    }
    last = rounds[-1]
    foreign = max(
        max(r["plain"]["foreign_cpu_cores"], r["prefect"]["foreign_cpu_cores"]) for r in rounds
    )
    return rounded(
        {
            **headline,
            "prefect_tasks": last["prefect"]["prefect_tasks"],
            "prefect_flows": last["prefect"]["prefect_flows"],
            "visits": visits,
            "repeats": len(rounds),
            "server_start_s": statistics.median(r["prefect"]["server_start_s"] for r in rounds),
            "trivial_flow_s": statistics.median(r["prefect"]["trivial_flow_s"] for r in rounds),
            "prefect_import_s": statistics.median(r["prefect"]["prefect_import_s"] for r in rounds),
            "stage_s_plain": last["plain"]["stage_s"],
            "stage_s_prefect": last["prefect"]["stage_s"],
            "step_span_s_plain": last["plain"]["step_span_s"],
            "step_span_s_prefect": last["prefect"]["step_span_s"],
            "prefect_task_s": last["prefect"]["prefect_task_s"],
            "prefect_tasks_by_name": last["prefect"]["prefect_tasks_by_name"],
            "prefect_flows_by_name": last["prefect"]["prefect_flows_by_name"],
            "prefect_task_states": last["prefect"]["prefect_task_states"],
            "load_average": {"before": load_before, "after": load_after},
            "foreign_cpu_cores_max": foreign,
            "noisy": load_before >= 1.0 or foreign > FOREIGN_CPU_NOISY,
            "cores": CORES,
            "rounds": rounds,
        },
        4,
        2,
    )


# ----------------------------------------------------------------------------------------------
# Output


def print_table(fig: Mapping[str, Any]) -> None:
    """The headline figures, then where the time went, stage by stage."""
    rows = [
        ("driver_wall_s", "plain driver, process start to exit"),
        ("campaign_wall_s", "Prefect: server start + flow run process"),
        ("server_start_s", "  of which the server's start until healthy"),
        ("prefect_start_s", "Prefect's fixed start (server + extra delay to 1st stage)"),
        ("prefect_stop_s", "Prefect's extra delay from the last stage to the exit"),
        ("overhead_fraction", "beyond the fixed start (target <= 0.05)"),
        ("overhead_fraction_beyond_start_and_stop", "beyond the fixed start and stop"),
        ("cpu_overhead_fraction", "CPU s: (Prefect run + server - plain) / plain"),
        ("trivial_flow_s", "fresh process running a no-op flow (cross-check)"),
        ("prefect_import_s", "fresh process importing prefect only"),
        ("prefect_tasks", "task runs recorded by the server"),
        ("prefect_flows", "flow runs recorded by the server"),
    ]
    print(f"\n{'figure':<40} {'value':>10}  meaning")
    for key, meaning in rows:
        value = fig[key]
        shown = (
            f"{value:.3f}"
            if "fraction" in key
            else f"{value:,.2f}"
            if isinstance(value, float)
            else f"{value}"
        )
        print(f"{key:<40} {shown:>10}  {meaning}")
    print(
        "\ntask runs by name:",
        ", ".join(f"{k} {v}" for k, v in fig["prefect_tasks_by_name"].items()),
    )
    print(
        "flow runs by name:", ", ".join(f"{k} {v}" for k, v in fig["prefect_flows_by_name"].items())
    )
    plain, flows, tasks = fig["stage_s_plain"], fig["stage_s_prefect"], fig["prefect_task_s"]
    print(
        f"\n{'stage (sum over step, site)':<28} {'plain s':>9} {'Prefect s':>10} {'task run s':>11}"
    )
    for stage in sorted(set(plain) | set(flows), key=lambda s: -float(flows.get(s, 0.0))):
        print(
            f"{stage:<28} {plain.get(stage, 0.0):>9.1f} {flows.get(stage, 0.0):>10.1f} "
            f"{tasks.get(stage, 0.0):>11.1f}"
        )
    spans_p, spans_f = fig["step_span_s_plain"], fig["step_span_s_prefect"]
    print(f"\n{'step span (first start to last end)':<36} {'plain s':>9} {'Prefect s':>10}")
    for step in spans_f:
        print(f"{step:<36} {spans_p.get(step, 0.0):>9.1f} {spans_f[step]:>10.1f}")
    last = fig["rounds"][-1]
    print(
        f"\nCPU seconds: plain run {last['plain']['cpu_s']:.0f}, Prefect run "
        f"{last['prefect']['cpu_s']:.0f} + server {last['prefect']['server_cpu_s']:.0f}; "
        f"start delay to the first stage plain {last['plain']['start_delay_s']:.1f} s, Prefect "
        f"{last['prefect']['start_delay_s']:.1f} s; last stage to exit plain "
        f"{last['plain']['end_delay_s']:.1f} s, Prefect {last['prefect']['end_delay_s']:.1f} s"
    )
    load = fig["load_average"]
    print(
        f"load average before {load['before']:.2f}, after {load['after']:.2f} on {CORES} cores; "
        f"other work took up to {fig['foreign_cpu_cores_max']:.2f} cores during a run"
    )
    if fig["noisy"]:
        print(
            "NOTE: the machine was busy with other work (load average >= 1 before the runs, or "
            f"other processes above {FOREIGN_CPU_NOISY} cores during one): timings are noisy"
        )


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="4 visits instead of 8")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each (medians reported)")
    ap.add_argument("--keep", action="store_true", help="keep the work directories and logs")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "orchestration.json"
    )
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    fig = measure(4 if args.quick else 8, args.repeats, args.keep)
    fig["quick"] = args.quick
    print_table(fig)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fig, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
