"""QuantumGraph building and execution: our Dask backends versus the ``pipetask`` CLI.

Setup: the dc2-test-med-1 campaign scaled down (LSSTComCam focal plane, 9 detectors; N = 12
visits with ``--quick``, 40 otherwise), planned in memory; the three site repositories are
populated with small mock files and each non-hub site receives the raws of its own visits from the
hub (``transfer_from``, as the tests do). Then:

- graph build: the step1 graphs of the three sites, (a) built in parallel on a Dask client with
  two worker processes (``build_graphs_parallel``; the client is started before the clock, the
  workers' first imports are on the clock), (b) built one after another with ``pipetask qgraph``
  subprocesses (same pipeline subset, inputs, output run and query; datastore records attached);
- execution: the step1 graph of every visit at the hub (N x 9 detectors x 2 tasks), (a) through
  the quantum-backed butler on a two-worker-process Dask client (``pre_exec_init`` +
  ``execute_graph`` + ``aggregate``), (b) ``pipetask run -g`` on the same saved graph in a copy of
  the hub repository taken before (a) (single process, ``pipetask run``'s default).

Prints the figures and writes JSON:

    qgraph_ratio: our parallel build wall / sequential pipetask qgraph wall
    exec_ratio: our execution wall / pipetask run wall
    quanta, quanta_per_s: quanta executed, and our throughput
    plus detail keys (``*_s`` wall times, ``sites``, ``visits``, ...)

Usage: python benchmarks/qgraph_exec.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from drp_campaign.backends import zipfix

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml"
PIPELINE = ROOT / "pipelines" / "DRP-mock.yaml"
INSTRUMENT = "LSSTComCam"
FILE_SIZE = 256
BIN = Path(sys.executable).parent


def _pipetask() -> str:
    exe = BIN / "pipetask"
    return str(exe) if exe.exists() else "pipetask"


def setup(work: Path, visits: int) -> tuple[Any, Any, dict[str, Path]]:
    """Write the scaled-down spec, plan it, populate the site repos and give sites their raws.

    Returns
    -------
    spec, plan, repos
        The `CampaignSpec`, the `MemoryPlan` and site -> repository root.
    """
    from drp_campaign.backends.butler import copy_raws, populate_site_repos
    from drp_campaign.backends.qgraph import site_selections
    from drp_campaign.model.focalplane import focal_plane
    from drp_campaign.model.plan import plan_visits
    from drp_campaign.model.sky import sky_map_for
    from drp_campaign.model.spec import load_spec
    from drp_campaign.model.survey import make_survey

    data = yaml.safe_load(SPEC.read_text())
    data["instrument"] = INSTRUMENT
    data["survey"] = {"preset": "dc2-test-med-1", "seed": 1, "visits": visits}
    data["pipeline"] = {"yaml": str(PIPELINE)}
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(spec_path)
    assert spec.survey.preset is not None
    table = make_survey(spec.survey.preset, spec.survey.seed, visits=visits)
    sky = sky_map_for(spec.skymap)
    plan = plan_visits(sky, focal_plane(spec.instrument), table, spec.shares)
    repos = {
        s: r.root for s, r in populate_site_repos(work, spec, plan, file_size=FILE_SIZE).items()
    }
    selections = site_selections(plan, spec.site_names)
    for site, root in repos.items():
        if site != spec.hub:
            copy_raws(repos[spec.hub], root, spec.instrument, selections[site].visits.tolist())
    return spec, plan, repos


def _run(cmd: Sequence[str], what: str) -> float:
    """Run a command, return its wall time; raise with its output tail if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return wall


def _quanta_of(path: Path) -> int:
    import lsst.pipe.base.tests.mocks  # noqa: F401
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    with PredictedQuantumGraph.open(str(path)) as reader:
        reader.read_thin_graph()
    graph = reader.finish()
    return sum(len(q) for q in graph.quanta_by_task.values())


def bench_qgraph(
    spec: Any, plan: Any, repos: Mapping[str, Path], work: Path, client: Any
) -> dict[str, Any]:
    """Step1 graphs of every site: in parallel on Dask, then one after another with pipetask."""
    from drp_campaign.backends.qgraph import build_graph, build_graphs_parallel, step_requests

    # Baseline first: pipetask qgraph, one site after another, same arguments as ours.
    base_requests = step_requests(spec, plan, "step1", repos, work / "graphs-pipetask")
    per_site: dict[str, float] = {}
    t0 = time.perf_counter()
    for req in base_requests:
        Path(req.out_file).parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            _pipetask(),
            "qgraph",
            "-b",
            req.repo_root,
            "-p",
            f"{req.pipeline_yaml}#{req.subset}",
            "-i",
            ",".join(req.input_collections),
            "--output-run",
            req.output_run,
            "-d",
            req.where,
            "--qgraph-datastore-records",
            "--save-qgraph",
            req.out_file,
        ]
        per_site[req.site] = _run(cmd, f"pipetask qgraph at {req.site}")
    pipetask_s = time.perf_counter() - t0

    requests = step_requests(spec, plan, "step1", repos, work / "graphs-ours")
    t0 = time.perf_counter()
    summaries = build_graphs_parallel(requests, client)
    ours_s = time.perf_counter() - t0
    # A second build on the now-warm workers (imports paid): what a long-lived executor sees.
    # Submitted directly with Dask's unique keys: build_graphs_parallel names its tasks
    # "qgraph-<i>-<site>", so a second call on the same client can get the first call's results
    # back without building anything.
    warm = step_requests(spec, plan, "step1", repos, work / "graphs-warm")
    t0 = time.perf_counter()
    futures = [
        client.submit(
            build_graph,
            r.repo_root,
            r.pipeline_yaml,
            r.subset,
            r.where,
            r.input_collections,
            r.output_run,
            r.out_file,
            site=r.site,
            pure=False,
        )
        for r in warm
    ]
    client.gather(futures)
    warm_s = time.perf_counter() - t0
    if not all(Path(r.out_file).exists() for r in warm):
        raise RuntimeError("warm rebuild did not write its graphs")

    # Same graphs either way.
    for summary, req in zip(summaries, base_requests, strict=True):
        theirs = _quanta_of(Path(req.out_file))
        if theirs != summary.n_quanta:
            raise RuntimeError(
                f"{req.site}: pipetask graph has {theirs} quanta, ours {summary.n_quanta}"
            )
    return {
        "qgraph_ours_s": ours_s,
        "qgraph_ours_warm_s": warm_s,
        "qgraph_pipetask_s": pipetask_s,
        "qgraph_pipetask_per_site_s": per_site,
        "qgraph_quanta_per_site": {s.site: s.n_quanta for s in summaries},
    }


def _count_outputs(repo: Path, run: str, instrument: str) -> dict[str, int]:
    import lsst.pipe.base.tests.mocks  # noqa: F401
    from lsst.daf.butler import Butler

    with Butler.from_config(str(repo), writeable=False) as butler:
        return {
            name: len(
                butler.query_datasets(
                    name, collections=run, instrument=instrument, explain=False, limit=None
                )
            )
            for name in ("pvi", "single_visit_star")
        }


def bench_exec(spec: Any, repos: Mapping[str, Path], work: Path, client: Any) -> dict[str, Any]:
    """Step1 of every visit at the hub: ours on Dask versus ``pipetask run`` on the same graph."""
    from drp_campaign.backends.butler import collections_for
    from drp_campaign.backends.local.workload import aggregate, execute_graph, pre_exec_init
    from drp_campaign.backends.qgraph import build_graph, step_query

    hub = repos[spec.hub]
    run = f"{spec.campaign}/bench/step1/{spec.hub}/run"
    graph = work / "exec" / "step1-hub.qg"
    summary = build_graph(
        hub,
        PIPELINE,
        "step1",
        step_query(spec.instrument, spec.skymap.name),
        [collections_for(spec.instrument).defaults],
        run,
        graph,
        site=spec.hub,
    )
    # The baseline's repository: a copy taken before our run writes anything.
    base_repo = work / "exec" / "hub-copy"
    shutil.copytree(hub, base_repo)

    # Python < 3.12.9 / 3.13.2 has CPython gh-127847; our backends apply the upstream fix
    # (drp_campaign.backends.zipfix). Record whether this interpreter needed it.
    zip_patched = zipfix.is_broken()
    zipfix.apply()

    t0 = time.perf_counter()
    pre_exec_init(graph, hub)
    in_quantum: list[float] = []
    report = execute_graph(
        graph, hub, client, progress=lambda done, total, o: in_quantum.append(o.seconds)
    )
    if not report.ok:
        raise RuntimeError("our execution failed:\n" + report.describe_failures())
    aggregate(graph, hub)
    ours_s = time.perf_counter() - t0

    cmd = [
        _pipetask(),
        "run",
        "-b",
        str(base_repo),
        "-g",
        str(graph),
        "--register-dataset-types",
    ]
    pipetask_s = _run(cmd, "pipetask run")

    ours_out = _count_outputs(hub, run, spec.instrument)
    theirs_out = _count_outputs(base_repo, run, spec.instrument)
    if ours_out != theirs_out or ours_out["pvi"] == 0:
        raise RuntimeError(f"outputs differ: ours {ours_out}, pipetask run {theirs_out}")
    return {
        "quanta": summary.n_quanta,
        "exec_ours_s": ours_s,
        "exec_ours_execute_s": report.wall_s,
        "exec_pipetask_s": pipetask_s,
        "exec_ours_mean_quantum_s": sum(in_quantum) / max(len(in_quantum), 1),
        "exec_outputs": ours_out,
        "zipfile_seek_patched": zip_patched,
    }


def main() -> None:
    """Command-line entry point."""
    from drp_campaign.planner import dask_client

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 visits instead of 40 (< 5 min)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "qgraph_exec.json"
    )
    args = ap.parse_args()
    n_visits = 12 if args.quick else 40
    with tempfile.TemporaryDirectory(prefix="qgraph-exec-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        spec, plan, repos = setup(work, n_visits)
        print(
            f"setup: {n_visits} visits, {len(repos)} site repos populated in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        t0 = time.perf_counter()
        with dask_client(workers=2) as client:
            client_s = time.perf_counter() - t0
            print(f"dask client with 2 worker processes started in {client_s:.1f} s", flush=True)
            q = bench_qgraph(spec, plan, repos, work, client)
            per_site = ", ".join(f"{s} {n}" for s, n in q["qgraph_quanta_per_site"].items())
            print(
                f"graph build, step1 at {len(repos)} sites ({per_site} quanta): "
                f"ours in parallel {q['qgraph_ours_s']:.2f} s "
                f"(warm workers {q['qgraph_ours_warm_s']:.2f} s), "
                f"pipetask qgraph sequential {q['qgraph_pipetask_s']:.2f} s",
                flush=True,
            )
            e = bench_exec(spec, repos, work, client)
    qgraph_ratio = q["qgraph_ours_s"] / q["qgraph_pipetask_s"]
    exec_ratio = e["exec_ours_s"] / e["exec_pipetask_s"]
    quanta_per_s = e["quanta"] / e["exec_ours_s"]
    print(
        f"qgraph_ratio (ours / pipetask qgraph, wall): {qgraph_ratio:.3f} "
        f"({(q['qgraph_ours_s'] + client_s) / q['qgraph_pipetask_s']:.3f} counting the Dask "
        f"client start, {q['qgraph_ours_warm_s'] / q['qgraph_pipetask_s']:.3f} on warm workers)"
    )
    print(
        f"execution, step1 of {n_visits} visits at the hub ({e['quanta']} quanta): "
        f"ours {e['exec_ours_s']:.2f} s on 2 workers (pre-exec-init + execute + aggregate), "
        f"pipetask run {e['exec_pipetask_s']:.2f} s single process; mean time inside a "
        f"quantum on our workers {e['exec_ours_mean_quantum_s']:.3f} s"
    )
    print(f"exec_ratio (ours / pipetask run, wall): {exec_ratio:.3f}")
    print(
        f"quanta_per_s (ours): {quanta_per_s:.1f}; pipetask run: "
        f"{e['quanta'] / e['exec_pipetask_s']:.1f}"
    )
    result: dict[str, Any] = {
        "qgraph_ratio": round(qgraph_ratio, 3),
        "exec_ratio": round(exec_ratio, 3),
        "quanta": e["quanta"],
        "quanta_per_s": round(quanta_per_s, 2),
        "qgraph_ours_s": round(q["qgraph_ours_s"], 3),
        "qgraph_ours_warm_s": round(q["qgraph_ours_warm_s"], 3),
        "qgraph_pipetask_s": round(q["qgraph_pipetask_s"], 3),
        "qgraph_pipetask_per_site_s": {
            k: round(v, 3) for k, v in q["qgraph_pipetask_per_site_s"].items()
        },
        "qgraph_quanta_per_site": q["qgraph_quanta_per_site"],
        "exec_ours_s": round(e["exec_ours_s"], 3),
        "exec_ours_execute_s": round(e["exec_ours_execute_s"], 3),
        "exec_ours_mean_quantum_s": round(e["exec_ours_mean_quantum_s"], 4),
        "exec_pipetask_s": round(e["exec_pipetask_s"], 3),
        "exec_pipetask_quanta_per_s": round(e["quanta"] / e["exec_pipetask_s"], 2),
        "dask_client_start_s": round(client_s, 3),
        "sites": len(repos),
        "visits": n_visits,
        "workers": 2,
        "quick": args.quick,
        "zipfile_seek_patched": e["zipfile_seek_patched"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
