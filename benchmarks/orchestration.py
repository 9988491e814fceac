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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _campaign import (
    ROOT,
    LedgerRow,
    Run,
    demo_spec,
    ledger_rows,
    load_average,
    log_tail,
    prefect_counts,
    prefect_server,
    rounded,
    run_cli,
    seed_repos,
    server_cpu_s,
)

CORES = os.cpu_count() or 1
# Timings are flagged as noisy when other work averaged more than this many cores during a run.
FOREIGN_CPU_NOISY = 0.25

# ----------------------------------------------------------------------------------------------
# Helpers


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
        raise RuntimeError(f"the plain driver failed (exit {run.rc}):\n{log_tail(log)}")
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
    with prefect_server(work / "prefect") as server:
        server_cpu0 = server_cpu_s(server.pid)
        run = run_cli(
            ["run", str(spec), "--workdir", str(work), "--no-verify"], log, env=server.env
        )
        server_cpu = server_cpu_s(server.pid) - server_cpu0
        if run.rc != 0:
            raise RuntimeError(f"the Prefect run failed (exit {run.rc}):\n{log_tail(log)}")
        counts = prefect_counts(server.api_url)
        noop_s, import_s = trivial_flow_s(server.env)
    server_s = server.start_s
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
