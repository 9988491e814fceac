"""QuantumGraphs of every step at every site, built by lsst-pipe-base from the plan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lsst.pipe.base.tests.mocks  # noqa: F401  (mock storage classes in this process)
import numpy as np
import pytest
from lsst.daf.butler import Butler, DataCoordinate
from lsst.pipe.base import Pipeline
from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

from drp_campaign.backends.butler import (
    collections_for,
    copy_raws,
    ingest_mock_datasets,
    populate_site_repos,
)
from drp_campaign.backends.qgraph import (
    EmptyGraphError,
    GraphRequest,
    build_graph,
    build_graphs_parallel,
    build_request,
    site_selections,
    step_query,
    step_requests,
)
from drp_campaign.model.plan import MemoryPlan
from drp_campaign.model.spec import CampaignSpec, StepSpec

from .test_butler_repos import INSTRUMENT, REPO_ROOT, SKYMAP, small_campaign

PIPELINE = str(REPO_ROOT / "pipelines" / "DRP-mock.yaml")
DEFAULTS = collections_for(INSTRUMENT).defaults
FAKE_RUN = "fake/upstream"
N_DET = 9

# Every subset of the pipeline as a step (the spec's own list stops at step4).
ALL_STEPS = [
    StepSpec(name="step1", subset="step1", shard="visit", placement="per-site"),
    StepSpec(name="step2", subset="step2", shard="visit", placement="per-site"),
    StepSpec(name="step2c", subset="step2c", shard="none", placement="gather"),
    StepSpec(name="step3", subset="step3", shard="tract", placement="per-site"),
    StepSpec(name="step4", subset="step4", shard="visit", placement="per-site"),
    StepSpec(name="step5", subset="step5", shard="tract", placement="per-site"),
    StepSpec(name="step6", subset="step6", shard="visit", placement="per-site"),
    StepSpec(name="step7", subset="step7", shard="none", placement="gather"),
]

Campaign = tuple[CampaignSpec, MemoryPlan, dict[str, Path], Path]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    tmp = tmp_path_factory.mktemp("qgraph")
    spec, plan = small_campaign(tmp)
    spec = spec.model_copy(update={"steps": ALL_STEPS})
    repos = {s: r.root for s, r in populate_site_repos(tmp, spec, plan, file_size=200).items()}
    # Raws reach the other sites by transfer (issue 4's job); copy each site's own visits here.
    selections = site_selections(plan, spec.site_names)
    for site, root in repos.items():
        if site != spec.hub:
            copy_raws(repos[spec.hub], root, INSTRUMENT, selections[site].visits.tolist())
    return spec, plan, repos, tmp


def _quanta(path: Path) -> Mapping[str, Mapping[DataCoordinate, object]]:
    with PredictedQuantumGraph.open(path) as reader:
        reader.read_thin_graph()
        graph = reader.finish()
    return graph.quanta_by_task


def _fake_missing_inputs(root: Path, subset: str) -> None:
    """Ingest mock datasets for every overall input of a subset that has none in the repo."""
    with Butler.from_config(str(root), writeable=True) as butler:
        graph = Pipeline.from_uri(f"{PIPELINE}#{subset}").to_graph(registry=butler.registry)
        butler.collections.register(FAKE_RUN)
        for name, node in graph.iter_overall_inputs():
            assert node is not None
            present = butler.registry.queryDatasetTypes(name) and butler.query_datasets(
                name, collections=[DEFAULTS, FAKE_RUN], explain=False, limit=1, find_first=False
            )
            if not present:
                ingest_mock_datasets(
                    butler,
                    node.dataset_type,
                    FAKE_RUN,
                    where=f"instrument = '{INSTRUMENT}' AND skymap = '{SKYMAP}'",
                    size_bytes=100,
                )


def _expected_counts(plan: MemoryPlan, spec: CampaignSpec, site: str) -> dict[str, int]:
    """Quanta counts the plan implies for the tasks whose data IDs it decides."""
    sel = site_selections(plan, spec.site_names)[site]
    o = plan.overlaps
    in_visits = np.isin(o.visit, sel.visits)
    site_keys = set(zip(sel.patches["tract"].tolist(), sel.patches["patch"].tolist(), strict=True))
    in_patches = np.array(
        [(t, p) in site_keys for t, p in zip(o.tract, o.patch, strict=True)], dtype=bool
    )
    band = dict(zip(plan.visits["visit"], plan.visits["band"], strict=True))
    n_v = int(sel.visits.size)
    return {
        "isr": N_DET * n_v,
        "calibrateImage": N_DET * n_v,
        "consolidateVisitSummary": n_v,
        "makeWarp": len(
            set(zip(o.visit[in_patches], o.tract[in_patches], o.patch[in_patches], strict=True))
        ),
        "assembleCoadd": len(
            {
                (t, p, band[v])
                for v, t, p in zip(
                    o.visit[in_patches], o.tract[in_patches], o.patch[in_patches], strict=True
                )
            }
        ),
        "forcedPhotCcd": len(
            set(zip(o.visit[in_visits], o.detector[in_visits], o.tract[in_visits], strict=True))
        ),
        "consolidateSourceTable": n_v,
    }


def test_step_query() -> None:
    import pandas as pd

    assert step_query("LSSTComCam", "sm") == "instrument = 'LSSTComCam' AND skymap = 'sm'"
    assert step_query("I", "sm", visits=[3, 1, 3]).endswith("visit IN (1, 3)")
    patches = pd.DataFrame({"tract": [1, 1, 2], "patch": [0, 1, 5]})
    assert step_query("I", "sm", patches=patches, tract_sizes={1: 2, 2: 100}).endswith(
        "AND (tract IN (1) OR (tract = 2 AND patch IN (5)))"
    )
    # Without tract sizes every tract lists its patches.
    assert step_query("I", "sm", patches=patches.iloc[:2]).endswith(
        "AND (tract = 1 AND patch IN (0, 1))"
    )
    with pytest.raises(ValueError, match="no visits"):
        step_query("I", "sm", visits=[])


def test_step1_at_every_site_in_parallel_processes(campaign: Campaign) -> None:
    spec, plan, repos, tmp = campaign
    requests = step_requests(spec, plan, "step1", repos, tmp / "graphs-pool")
    assert [r.site for r in requests] == spec.site_names
    summaries = build_graphs_parallel(requests)
    selections = site_selections(plan, spec.site_names)
    for summary in summaries:
        expected = _expected_counts(plan, spec, summary.site)
        assert summary.per_task == {k: expected[k] for k in ("isr", "calibrateImage")}
        assert summary.file.exists() and summary.step == "step1"
        visits = {d["visit"] for d in _quanta(summary.file)["calibrateImage"]}
        assert visits == set(selections[summary.site].visits.tolist())


def test_step1_with_a_dask_client(campaign: Campaign) -> None:
    from drp_campaign.planner import dask_client

    spec, plan, repos, tmp = campaign
    requests = step_requests(spec, plan, "step1", repos, tmp / "graphs-dask")
    with dask_client(workers=2) as client:
        summaries = build_graphs_parallel(requests, client)
        # A second call on the same client builds again (new files), never reuses old results.
        again = step_requests(spec, plan, "step1", repos, tmp / "graphs-dask-again")
        rebuilt = build_graphs_parallel(again, client)
    assert [s.site for s in summaries] == spec.site_names
    for summary in summaries:
        expected = _expected_counts(plan, spec, summary.site)
        assert summary.n_quanta == expected["isr"] + expected["calibrateImage"]
    assert [s.file for s in rebuilt] == [Path(r.out_file) for r in again]
    assert all(s.file.exists() for s in rebuilt)


def test_whole_pipeline_at_every_site(campaign: Campaign) -> None:
    spec, plan, repos, tmp = campaign
    selections = site_selections(plan, spec.site_names)
    for site in spec.site_names:
        where = step_query(INSTRUMENT, SKYMAP, visits=selections[site].visits)
        summary = build_graph(
            repos[site],
            PIPELINE,
            None,
            where,
            [DEFAULTS],
            f"u/whole/{site}",
            tmp / "whole" / f"{site}.qg",
            site=site,
        )
        # One graph with quanta of every step: 22 tasks, all present.
        assert len(summary.per_task) == 22
        o = plan.overlaps
        mine = np.isin(o.visit, selections[site].visits)
        assert summary.per_task["makeWarp"] == len(
            set(zip(o.visit[mine], o.tract[mine], o.patch[mine], strict=True))
        )
        assert summary.per_task["isr"] == N_DET * selections[site].visits.size
        assert summary.per_task["fgcmOutputProducts"] == 1


def test_every_step_at_every_site(campaign: Campaign) -> None:
    spec, plan, repos, tmp = campaign
    selections = site_selections(plan, spec.site_names)
    for step in ALL_STEPS:
        requests = step_requests(
            spec, plan, step.name, repos, tmp / "steps", input_collections=[DEFAULTS, FAKE_RUN]
        )
        gathered = step.placement == "gather"
        assert [r.site for r in requests] == ([spec.hub] if gathered else spec.site_names)
        for request in requests:
            _fake_missing_inputs(Path(request.repo_root), step.subset)
            summary = build_request(request)
            assert summary.n_quanta > 0, (step.name, request.site)
            expected = _expected_counts(plan, spec, request.site)
            for task, n in summary.per_task.items():
                if task in expected and not gathered:
                    assert n == expected[task], (step.name, request.site, task)
            if step.shard == "tract":
                quanta = _quanta(summary.file)
                sel = selections[request.site]
                site_tracts = set(sel.patches["tract"].tolist())
                for data_ids in quanta.values():
                    assert {d["tract"] for d in data_ids} <= site_tracts


def test_empty_graph_names_step_site_and_query(campaign: Campaign) -> None:
    spec, plan, repos, tmp = campaign
    (request,) = [
        r for r in step_requests(spec, plan, "step3", repos, tmp / "e") if r.site == "FrDF"
    ]
    with pytest.raises(EmptyGraphError) as info:
        build_graph(
            request.repo_root,
            PIPELINE,
            "step3",
            request.where,
            [DEFAULTS],
            "u/empty",
            tmp / "empty.qg",
            site="FrDF",
        )
    message = str(info.value)
    assert "'step3'" in message and "'FrDF'" in message and request.where in message
    assert info.value.step == "step3" and info.value.site == "FrDF"
    assert not (tmp / "empty.qg").exists()


def test_graph_request_is_picklable() -> None:
    import pickle

    req = GraphRequest("r", "p.yaml", "step1", "w", ("c",), "run", "o.qg", site="S")
    assert pickle.loads(pickle.dumps(req)) == req
