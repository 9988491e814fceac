"""The dc2-test-med-1 campaign at full size through the Prefect flows (issue 12 item 7).

The spec ``deployments/campaigns/dc2-test-med-1.yaml`` (LSSTCam-imSim, 189 detectors, 3 sites,
5 steps) is written into a temporary directory with ``survey: {preset: dc2-test-med-1, seed: 1,
visits: N}`` for each ``--visits N`` (the whole preset without ``--visits``; 20 visits with
``--quick``) and the pipeline path made absolute. For each N, in a fresh work directory:
``drp-campaign seed`` (the observatory's part, not timed), a real local Prefect server started by
``scripts/prefect_server.py`` (always stopped afterwards), ``drp-campaign run SPEC --no-verify``
against it on the embedded default, the API's counts, then one ``pipetask qgraph`` of step1 at
the largest site.

Figures of each campaign (JSON keys):

- ``visits``, ``quanta``: the survey's visits; quanta of every graph built (ledger ``build``
  rows, ``n_quanta`` summed over every step, site and group).
- ``wall_s``: the ``drp-campaign run`` process, start to exit (the server's start is not in it:
  ``server_start_s``); ``quanta_per_s`` = quanta / wall_s; ``cost_per_quantum_s`` the inverse.
- ``stage_wall_s``: for each kind of ledger stage (plan, setup, distribute, stage, build, submit,
  publish, arrive, and any other the ledger has, e.g. bps), the wall time during which at least
  one stage of that kind ran (the union of their intervals: sites and groups overlap, so these
  do not add up); ``prefect``: wall_s minus the union of every ledger stage's interval, the time
  no stage ran: the process's start (imports, the Dask cluster, the flow runs created), the
  flow and task machinery between stages, and the exit. The plain sums are ``stage_sum_s``.
- ``graph_build_s``: the wall time of graph building for step1 at the largest site (most step1
  quanta): the union of its groups' ``build`` stages in the ledger (they build in parallel;
  one group without groups); ``graph_build_total_s`` is the sum of every build's own
  ``build_s`` (in the Dask worker) over the campaign.
- ``pipetask_qgraph_s``: one ``pipetask qgraph`` process, timed start to exit, run after the
  campaign against the same site's repository: the same pipeline#subset, the site's step1 input
  collections (from its BPS file), the data query of all the site's visits as ONE graph, a
  throwaway output run, datastore records attached (as ours), ``--save-qgraph`` to a temp file.
- ``groups``: ``step@site`` -> its number of groups (``<workdir>/plan/groups.json``).
- ``peak_rss_mb``: ``orchestrator``, the ``drp-campaign`` process, and ``largest_worker``, the
  largest of its descendants (the Dask workers), each the peak of /proc samples every 0.5 s.
- ``prefect_task_runs``, ``prefect_flow_runs``: what the server recorded (a subflow is a flow
  run and also a wrapper task run of its parent, see ``_campaign.prefect_counts``).
- ``ledger_rows``: rows of ``<workdir>/ledger.sqlite`` table ``stages``.
- ``report_passed``: the milestone report's verdict. ``drp-campaign run`` exits 1 when it has a
  failure (its processing-rate test follows the machine's load): the benchmark accepts that
  exit when every ledger stage is done, and fails on any other.
- ``dr1_projection``: ``{prefect_task_runs, ledger_rows, graphs}`` for DR1, 188,340 visits
  (issue 12's figure) with the sites, shares, steps and skymap of
  ``deployments/campaigns/dr1.yaml``. Its tracts come from the sky geometry (`dr1_tracts`: every
  tract of the rings the dr1 preset's declination range, widened by the focal plane's radius,
  touches); a site holds its share of the visits and of the tracts. Groups per step: a
  visit-sharded step ceil(site visits / 500) summed over sites, a tract-sharded one ceil(site
  tracts / 10), a gathered one 1 (the step's ``group`` bounds where the spec sets them); one
  graph per group. Task runs and ledger rows are this run's, split as measured: campaign-wide
  (kept), per step (the step's flow's wrapper task: times DR1's steps), per site-step (the
  site-step flow's wrapper task: times DR1's site-steps) and the rest per group
  (times DR1's groups). The inputs are in ``dr1_basis``.

Goals (``goals``: value, goal, pass): cost per quantum at the largest ``--visits`` over that at
the smallest <= 1.2 (only with two or more values); graph_build_s / pipetask_qgraph_s <= 0.6;
the orchestrator's peak RSS < 2 GB; the DR1 projection < 10,000 Prefect task runs. With several
``--visits`` the top level holds the largest campaign's figures and ``runs`` every campaign's.

The machine is shared: the load average before and after and the CPU other work took during the
run are reported (``noisy`` when either says so).

Usage: python benchmarks/full_campaign.py [--quick | --visits N [N ...]] [--keep] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import yaml
from _campaign import (
    ROOT,
    ledger_records,
    load_average,
    log_tail,
    prefect_counts,
    prefect_server,
    rounded,
    run_cli,
    seed_repos,
    server_cpu_s,
)

SPEC = ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml"
DR1_SPEC = ROOT / "deployments" / "campaigns" / "dr1.yaml"
QUICK_VISITS = 20
#: DR1's visits (issue 12); the dr1 preset's full list is 240,000 (DESIGN.md section 9).
DR1_VISITS = 188_340
#: The stages the ledger has today, always reported (0 when a run has none).
STAGES = ("plan", "setup", "distribute", "stage", "build", "submit", "publish", "arrive")
#: Task runs not made per site-step or group: the campaign's own (by `prefect_counts` kind).
CAMPAIGN_TASKS = ("plan", "setup", "distribute", "verify", "subflow drp-plan")
#: Task runs made once per step: the step flow's wrapper task in the campaign flow.
STEP_TASKS = ("subflow drp-step",)
#: Task runs made once per site-step: the site-step flow's wrapper task in the step flow.
SITE_STEP_TASKS = ("subflow drp-site-step",)
CAMPAIGN = "*"  # the ledger's step and site of campaign-wide stages (drp_campaign.ledger)
CORES = os.cpu_count() or 1
FOREIGN_CPU_NOISY = 0.25  # cores of other work during the run above which timings are noisy
SAMPLE_S = 0.5
MB = 1024 * 1024

GOAL_COST_RATIO = 1.2
GOAL_GRAPH_RATIO = 0.6
GOAL_RSS_MB = 2048.0
GOAL_DR1_TASKS = 10_000


# ----------------------------------------------------------------------------------------------
# Inputs


def full_spec(directory: Path, visits: int | None) -> Path:
    """Write dc2-test-med-1 with ``visits`` visits of its preset (all if `None`) in ``directory``.

    The pipeline path is made absolute: it is relative to the spec, which moves.
    """
    from drp_campaign.model.spec import load_spec

    data = yaml.safe_load(SPEC.read_text())
    survey = data.get("survey") or {}
    if survey.get("preset") != "dc2-test-med-1" or "pipeline" not in data:
        raise RuntimeError(f"{SPEC} no longer has the dc2-test-med-1 preset and a pipeline")
    data["survey"] = {"preset": "dc2-test-med-1", "seed": survey.get("seed", 1)}
    if visits is not None:
        data["survey"]["visits"] = visits
    # Resolved as the engine resolves it (relative to the spec's directory or the repository).
    data["pipeline"]["yaml"] = str(Path(load_spec(SPEC, check_files=True).pipeline.uri).resolve())
    path = directory / f"spec-{visits or 'all'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _pipetask() -> str:
    exe = Path(sys.executable).parent / "pipetask"
    return str(exe) if exe.exists() else "pipetask"


# ----------------------------------------------------------------------------------------------
# Memory


class TreeRss:
    """Peak RSS of a process and of its largest descendant, sampled every `SAMPLE_S` seconds."""

    def __init__(self) -> None:
        self.root_peak = 0
        self.child_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        """Start sampling ``pid``'s tree in a thread (``run_cli``'s ``on_start``)."""
        self._thread = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                self.root_peak = max(self.root_peak, root.memory_info().rss)
                children = root.children(recursive=True)
            except psutil.Error:  # the process is gone
                return
            for child in children:
                try:
                    self.child_peak = max(self.child_peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            self.samples += 1
            self._stop.wait(SAMPLE_S)


# ----------------------------------------------------------------------------------------------
# Ledger figures


def union_s(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals."""
    total, end = 0.0, -math.inf
    for start, finish in sorted(intervals):
        if finish > end:
            total += finish - max(start, end)
            end = finish
    return total


def stage_walls(rows: Sequence[Mapping[str, Any]], wall_s: float) -> dict[str, dict[str, float]]:
    """Per stage kind: the union of its intervals (``wall``) and their sum (``sum``).

    ``wall["prefect"]`` is ``wall_s`` minus the union of every stage's interval.
    """
    spans: dict[str, list[tuple[float, float]]] = {s: [] for s in STAGES}
    for r in rows:
        if r["started"] is not None and r["finished"] is not None:
            spans.setdefault(r["stage"], []).append((r["started"], r["finished"]))
    every = [span for kind in spans.values() for span in kind]
    wall = {kind: union_s(s) for kind, s in spans.items()}
    wall["prefect"] = max(wall_s - union_s(every), 0.0)
    sums = {kind: sum(b - a for a, b in s) for kind, s in spans.items()}
    return {"wall": wall, "sum": sums}


def builds(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ledger's finished ``build`` rows (one per site-step, or per group where grouped)."""
    return [r for r in rows if r["stage"] == "build" and "n_quanta" in r["figures"]]


def largest_site(rows: Sequence[Mapping[str, Any]], step: str) -> str:
    """The site whose graphs of ``step`` hold the most quanta."""
    quanta: dict[str, int] = {}
    for r in builds(rows):
        if r["step"] == step:
            quanta[r["site"]] = quanta.get(r["site"], 0) + int(r["figures"]["n_quanta"])
    if not quanta:
        raise RuntimeError(f"the ledger has no graph of {step}")
    return max(quanta, key=lambda s: quanta[s])


def read_groups(workdir: Path) -> dict[str, int]:
    """``step@site`` -> its number of groups, from ``plan/groups.json``."""
    doc = json.loads((workdir / "plan" / "groups.json").read_text())
    return {key: len(groups) for key, groups in doc.items()}


def campaign_finished(rc: int, rows: Sequence[Mapping[str, Any]], log: Path) -> bool:
    """Whether the milestone report passed, once sure the campaign did all its work.

    ``drp-campaign run`` exits 1 when the report has a failure even with every stage done: its
    processing-rate test follows the machine's load, and is the benchmarks' to judge. Any other
    exit, or a stage left unfinished, is the campaign failing.
    """
    unfinished = [r for r in rows if r["state"] not in ("DONE", "SKIPPED")]
    report_failed = rc == 1 and "the milestone report has failures" in log.read_text(
        errors="replace"
    )
    if (rc != 0 and not report_failed) or unfinished or not rows:
        where = ", ".join(f"{r['stage']} {r['step']}@{r['site']}" for r in unfinished)
        raise RuntimeError(
            f"the campaign failed (exit {rc}; unfinished: {where or 'none'}):\n{log_tail(log)}"
        )
    return rc == 0


# ----------------------------------------------------------------------------------------------
# pipetask qgraph


def pipetask_qgraph(spec_path: Path, workdir: Path, step: str, site: str, base: Path) -> float:
    """Wall of one ``pipetask qgraph`` of ``step`` at ``site``: all its visits, one graph."""
    from drp_campaign.backends.qgraph import site_selections, step_query
    from drp_campaign.model.bps import input_chain
    from drp_campaign.model.spec import load_spec

    spec = load_spec(spec_path)
    repo = str(workdir / "repos" / site)  # the embedded default's, unless the BPS file says
    inputs = input_chain(spec.campaign)
    bps = [
        r
        for r in ledger_records(workdir)
        if (r["step"], r["site"], r["stage"]) == (step, site, "bps") and "file" in r["figures"]
    ]
    if bps:  # what the campaign's own graph read (the same for every group of the site-step)
        payload = yaml.safe_load(Path(bps[0]["figures"]["file"]).read_text())["payload"]
        repo, inputs = payload["butlerConfig"], payload["inCollection"]
    if spec.step(step).shard != "visit":
        raise ValueError(f"{step} is not visit-sharded: its one graph is not the site's visits")
    visits = site_selections(workdir / "plan", spec.site_names)[site].visits.tolist()
    where = step_query(spec.instrument, spec.skymap.name, visits=visits)
    cmd = [
        _pipetask(),
        "qgraph",
        "-b",
        repo,
        "-p",
        f"{spec.pipeline.uri}#{spec.step(step).subset}",
        "-i",
        inputs,
        "--output-run",
        f"{spec.campaign}/bench/pipetask-qgraph/{step}/{site}",  # throwaway, never registered
        "-d",
        where,
        "--qgraph-datastore-records",
        "--save-qgraph",
        str(base / f"pipetask-{step}-{site}.qg"),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"pipetask qgraph failed (exit {done.returncode}):\n{tail}")
    return wall


# ----------------------------------------------------------------------------------------------
# DR1


def dr1_tracts() -> dict[str, Any]:
    """DR1's tracts from the sky geometry: every tract of the rings its visits' fields touch.

    The declination range is the dr1 preset's boresights, widened by the focal plane's radius
    (LSSTCam's); every ring of the dr1 spec's skymap that range touches is counted whole (the
    preset covers all right ascensions).
    """
    from drp_campaign.model.focalplane import focal_plane
    from drp_campaign.model.sky import sky_map_for
    from drp_campaign.model.spec import load_spec
    from drp_campaign.model.survey import make_survey

    spec = load_spec(DR1_SPEC)
    assert spec.survey.preset is not None
    dec = make_survey(spec.survey.preset, spec.survey.seed)["dec"]
    radius = focal_plane(spec.instrument).max_radius_deg
    sky = sky_map_for(spec.skymap)
    south, north = (int(r) for r in sky.ring_of_dec([dec.min() - radius, dec.max() + radius]))
    tracts = sum(sky.ring_tract_count(ring) for ring in range(south, north + 1))
    return {
        "tracts": tracts,
        "dec_deg": [round(float(dec.min()) - radius, 2), round(float(dec.max()) + radius, 2)],
        "rings": [south, north],
        "skymap": spec.skymap.name,
    }


def dr1_groups(visits: int, tracts: int) -> dict[str, Any]:
    """DR1's groups per step (dr1.yaml's sites, shares and steps) and its numbers of steps."""
    from drp_campaign.model.groups import step_bounds
    from drp_campaign.model.spec import load_spec

    spec = load_spec(DR1_SPEC)
    shares = spec.shares
    per_step: dict[str, int] = {}
    site_steps = 0
    for step in spec.steps:
        bounds = step_bounds(step.group)
        gathered = step.placement == "gather" or step.shard == "none"
        site_steps += 1 if gathered else len(shares)
        if gathered:
            per_step[step.name] = 1
        elif step.shard == "visit":
            per_step[step.name] = sum(
                math.ceil(round(visits * share) / bounds.visits) for share in shares.values()
            )
        else:
            per_step[step.name] = sum(
                math.ceil(round(tracts * share) / bounds.tracts) for share in shares.values()
            )
    return {
        "groups_per_step": per_step,
        "steps": len(spec.steps),
        "site_steps": site_steps,
        "shares": shares,
    }


def project_dr1(
    tasks_by_kind: Mapping[str, int],
    rows: Sequence[Mapping[str, Any]],
    groups: Mapping[str, int],
    steps: int,
) -> tuple[dict[str, int], dict[str, Any]]:
    """The DR1 projection and what it rests on (see the module docstring)."""
    measured_groups = sum(groups.values())
    campaign_tasks = sum(tasks_by_kind.get(k, 0) for k in CAMPAIGN_TASKS)
    step_tasks = sum(tasks_by_kind.get(k, 0) for k in STEP_TASKS)
    site_step_tasks = sum(tasks_by_kind.get(k, 0) for k in SITE_STEP_TASKS)
    group_tasks = sum(tasks_by_kind.values()) - campaign_tasks - step_tasks - site_step_tasks
    measured_site_steps = len(groups)
    campaign_rows = sum(1 for r in rows if r["step"] == CAMPAIGN)
    step_rows = sum(1 for r in rows if r["step"] != CAMPAIGN and r["site"] == CAMPAIGN)
    # A site-step's own rows (no group: e.g. "nothing assigned to this site").
    site_step_rows = sum(
        1 for r in rows if r["step"] != CAMPAIGN and r["site"] != CAMPAIGN and not r.get("grp")
    )
    group_rows = len(rows) - campaign_rows - step_rows - site_step_rows
    sky = dr1_tracts()
    dr1 = dr1_groups(DR1_VISITS, sky["tracts"])
    n_groups = sum(dr1["groups_per_step"].values())
    per_group_tasks = group_tasks / measured_groups
    per_group_rows = group_rows / measured_groups
    projection = {
        "prefect_task_runs": round(
            campaign_tasks
            + step_tasks / steps * dr1["steps"]
            + site_step_tasks / measured_site_steps * dr1["site_steps"]
            + per_group_tasks * n_groups
        ),
        "ledger_rows": round(
            campaign_rows
            + step_rows / steps * dr1["steps"]
            + site_step_rows / measured_site_steps * dr1["site_steps"]
            + per_group_rows * n_groups
        ),
        "graphs": n_groups,
    }
    basis = {
        "visits": DR1_VISITS,
        **sky,
        **dr1,
        "groups": n_groups,
        "measured_groups": measured_groups,
        "measured_steps": steps,
        "tasks_campaign": campaign_tasks,
        "tasks_per_step": step_tasks / steps,
        "measured_site_steps": measured_site_steps,
        "tasks_per_site_step": site_step_tasks / measured_site_steps,
        "tasks_per_group": per_group_tasks,
        "rows_campaign": campaign_rows,
        "rows_per_step": step_rows / steps,
        "rows_per_group": per_group_rows,
    }
    return projection, basis


# ----------------------------------------------------------------------------------------------
# One campaign


def measure(visits: int | None, keep: bool) -> dict[str, Any]:
    """Seed, run through the flows on a fresh server, count, and time pipetask qgraph."""
    from drp_campaign.model.spec import load_spec

    load_before = load_average()
    base = Path(tempfile.mkdtemp(prefix="bench-full-"))
    ok = False
    try:
        spec = full_spec(base, visits)
        work, log = base / "work", base / "run.log"
        t0 = time.perf_counter()
        seed_repos(spec, work)
        seed_s = time.perf_counter() - t0
        print(f"[{visits or 'all'} visits] seeded in {seed_s:.0f} s; running ...", flush=True)
        rss = TreeRss()
        with prefect_server(base / "prefect") as server:
            server_cpu0 = server_cpu_s(server.pid)
            try:
                run = run_cli(
                    ["run", str(spec), "--workdir", str(work), "--no-verify"],
                    log,
                    env=server.env,
                    on_start=rss.start,
                )
            finally:
                rss.stop()
            server_cpu = server_cpu_s(server.pid) - server_cpu0
            rows = ledger_records(work)
            report_passed = campaign_finished(run.rc, rows, log)
            counts = prefect_counts(server.api_url)
        print(f"[{visits or 'all'} visits] campaign in {run.wall_s:.0f} s", flush=True)
        groups = read_groups(work)
        n_visits = len(pd.read_parquet(work / "plan" / "visits.parquet", columns=["visit"]))
        steps = load_spec(spec).step_names
        step1 = steps[0]
        site = largest_site(rows, step1)
        pipetask_s = pipetask_qgraph(spec, work, step1, site, base)
        print(f"[{visits or 'all'} visits] pipetask qgraph in {pipetask_s:.0f} s", flush=True)
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"work directory and logs kept in {base}", file=sys.stderr)
    load_after = load_average()

    done = builds(rows)
    quanta = sum(int(r["figures"]["n_quanta"]) for r in done)
    # Wall time of that site-step's graph building: its groups build in parallel, so the span
    # they cover (the union of their build stages), comparable with one pipetask qgraph.
    graph_s = union_s(
        [
            (float(r["started"]), float(r["finished"]))
            for r in done
            if (r["step"], r["site"]) == (step1, site)
        ]
    )
    walls = stage_walls(rows, run.wall_s)
    foreign = max(run.busy_s - run.cpu_s - server_cpu, 0.0) / run.wall_s
    projection, basis = project_dr1(counts["prefect_tasks_by_name"], rows, groups, len(steps))
    return {
        "visits": n_visits,
        "quanta": quanta,
        "wall_s": run.wall_s,
        "quanta_per_s": quanta / run.wall_s,
        "cost_per_quantum_s": run.wall_s / quanta,
        "stage_wall_s": walls["wall"],
        "stage_sum_s": walls["sum"],
        "graph_build_s": graph_s,
        "graph_build_site": f"{step1}@{site}",
        "graph_build_total_s": sum(float(r["figures"].get("build_s", 0.0)) for r in done),
        "pipetask_qgraph_s": pipetask_s,
        "groups": groups,
        "peak_rss_mb": {"orchestrator": rss.root_peak / MB, "largest_worker": rss.child_peak / MB},
        "prefect_task_runs": counts["prefect_tasks"],
        "prefect_flow_runs": counts["prefect_flows"],
        "ledger_rows": len(rows),
        "report_passed": report_passed,
        "dr1_projection": projection,
        "dr1_basis": basis,
        "seed_s": seed_s,
        "server_start_s": server.start_s,
        "cpu_s": run.cpu_s,
        "server_cpu_s": server_cpu,
        "prefect_tasks_by_name": counts["prefect_tasks_by_name"],
        "prefect_flows_by_name": counts["prefect_flows_by_name"],
        "load_average": {"before": load_before, "after": load_after},
        "foreign_cpu_cores": foreign,
        "noisy": load_before >= 1.0 or foreign > FOREIGN_CPU_NOISY,
    }


# ----------------------------------------------------------------------------------------------
# Goals and output


def _goal(value: float | None, goal: str, passed: bool | None) -> dict[str, Any]:
    return {"value": value, "goal": goal, "pass": passed}


def goals(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's goals, each with its value and whether it holds (`None`: not measured)."""
    largest = max(runs, key=lambda r: r["visits"])
    smallest = min(runs, key=lambda r: r["visits"])
    ratio = (
        largest["cost_per_quantum_s"] / smallest["cost_per_quantum_s"]
        if largest is not smallest
        else None
    )
    graph = largest["graph_build_s"] / largest["pipetask_qgraph_s"]
    rss = max(r["peak_rss_mb"]["orchestrator"] for r in runs)
    dr1 = largest["dr1_projection"]["prefect_task_runs"]
    return {
        "cost_per_quantum_ratio": _goal(
            ratio,
            f"<= {GOAL_COST_RATIO} ({largest['visits']} vs {smallest['visits']} visits)",
            None if ratio is None else ratio <= GOAL_COST_RATIO,
        ),
        "graph_build_over_pipetask": _goal(
            graph, f"<= {GOAL_GRAPH_RATIO}", graph <= GOAL_GRAPH_RATIO
        ),
        "orchestrator_peak_rss_mb": _goal(rss, f"< {GOAL_RSS_MB:.0f}", rss < GOAL_RSS_MB),
        "dr1_prefect_task_runs": _goal(dr1, f"< {GOAL_DR1_TASKS}", dr1 < GOAL_DR1_TASKS),
    }


def print_table(fig: Mapping[str, Any]) -> None:
    """Each campaign's figures, where its time went, the DR1 projection and the goals."""
    for run in fig["runs"]:
        print(f"\n== {run['visits']} visits ==")
        for key in (
            "quanta",
            "wall_s",
            "quanta_per_s",
            "cost_per_quantum_s",
            "graph_build_s",
            "graph_build_total_s",
            "pipetask_qgraph_s",
            "prefect_task_runs",
            "prefect_flow_runs",
            "ledger_rows",
            "seed_s",
            "server_start_s",
        ):
            value = run[key]
            shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}"
            print(f"{key:<24} {shown:>12}")
        print(f"graph_build_site         {run['graph_build_site']:>12}")
        rss = run["peak_rss_mb"]
        print(
            f"peak RSS MB: orchestrator {rss['orchestrator']:.0f}, largest worker "
            f"{rss['largest_worker']:.0f}"
        )
        print(f"groups: {', '.join(f'{k} {v}' for k, v in run['groups'].items())}")
        print(f"\n{'stage':<12} {'wall s':>9} {'sum s':>9}")
        for stage, wall in sorted(run["stage_wall_s"].items(), key=lambda kv: -kv[1]):
            print(f"{stage:<12} {wall:>9.1f} {run['stage_sum_s'].get(stage, 0.0):>9.1f}")
        print(
            "task runs by name:",
            ", ".join(f"{k} {v}" for k, v in run["prefect_tasks_by_name"].items()),
        )
        dr1, basis = run["dr1_projection"], run["dr1_basis"]
        print(
            f"DR1 ({basis['visits']:,} visits, {basis['tracts']:,} tracts, {basis['groups']:,} "
            f"groups): {dr1['prefect_task_runs']:,} task runs, {dr1['ledger_rows']:,} ledger "
            f"rows, {dr1['graphs']:,} graphs"
        )
        load = run["load_average"]
        print(
            f"load average before {load['before']:.2f}, after {load['after']:.2f} on {CORES} "
            f"cores; other work took {run['foreign_cpu_cores']:.2f} cores"
            + (" (NOISY)" if run["noisy"] else "")
        )
    print(f"\n{'goal':<28} {'value':>10}  {'target':<28} result")
    for name, g in fig["goals"].items():
        value = "n/a" if g["value"] is None else f"{g['value']:,.3f}"
        result = "n/a" if g["pass"] is None else "PASS" if g["pass"] else "FAIL"
        print(f"{name:<28} {value:>10}  {g['goal']:<28} {result}")


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--visits",
        type=int,
        nargs="+",
        help="visits of the preset to run, one campaign each (default: the whole preset)",
    )
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_VISITS} visits")
    ap.add_argument("--keep", action="store_true", help="keep the work directories and logs")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "full_campaign.json"
    )
    args = ap.parse_args()
    if args.quick and args.visits:
        ap.error("--quick is --visits 20: give one or the other")
    if args.visits and min(args.visits) < 1:
        ap.error("--visits must be >= 1")
    todo: list[int | None] = (
        [QUICK_VISITS] if args.quick else sorted(set(args.visits)) if args.visits else [None]
    )
    t0 = time.perf_counter()
    runs = [rounded(measure(n, args.keep), 4, 2) for n in todo]
    largest = max(runs, key=lambda r: r["visits"])
    fig = {
        **largest,
        "goals": rounded(goals(runs), 4, 2),
        "runs": runs,
        "quick": args.quick,
        "cores": CORES,
        "benchmark_s": round(time.perf_counter() - t0, 1),
    }
    print_table(fig)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fig, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
