"""The plain driver: every step of the emulated DRP at one site (the single-site reference)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drp_campaign.backends.butler import open_repo
from drp_campaign.driver import reference_collection, run_single_site
from drp_campaign.model.spec import load_spec
from drp_campaign.model.survey import make_survey
from drp_campaign.planner import dask_client

ROOT = Path(__file__).resolve().parent.parent.parent
DC2 = ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml"


@pytest.mark.slow
def test_single_site_reference_runs_every_step_and_resumes(tmp_path: Path) -> None:
    spec = load_spec(DC2).model_copy(update={"instrument": "LSSTComCam"})
    visits = make_survey("dc2-test-med-1", seed=1, visits=3)
    root = tmp_path / "reference"
    stages: list[tuple[str, str]] = []
    with dask_client(workers=2) as client:
        first = run_single_site(
            spec, root, visits, client, progress=lambda s, st: stages.append((s, st))
        )
        assert [s.step for s in first.steps] == spec.step_names
        assert all(not s.skipped and s.n_quanta > 0 for s in first.steps)
        assert stages[:3] == [("step1", "build"), ("step1", "execute"), ("step1", "aggregate")]
        # A rerun finds every step's run in the output chain and does nothing again.
        again = run_single_site(spec, root, visits, client)
    assert all(s.skipped for s in again.steps) and again.n_quanta == 0

    out = reference_collection(spec.campaign)
    with open_repo(root, writeable=False) as butler:
        chain = list(butler.collections.get_info(out).children)
        assert chain[: len(spec.steps)] == [f"{out}/{s}" for s in reversed(spec.step_names)]
        kw = {"collections": out, "instrument": spec.instrument, "skymap": spec.skymap.name}
        pvis = butler.query_datasets("pvi", **kw)
        assert len(pvis) == 3 * 9  # every (visit, detector) of ComCam
        assert len(butler.query_datasets("visitSummary", **kw)) == 3
        assert len(butler.query_datasets("fgcmPhotoCalibCatalog", **kw)) == 3
        coadds = butler.query_datasets("deepCoadd", **kw)
        warps = butler.query_datasets("directWarp", **kw)
        assert coadds and warps
        # Every coadd was made from warps of its own patch (provenance of the mock outputs).
        coadd = butler.get(coadds[0])
        inputs = [i for conn in coadd.quantum.inputs.values() for i in conn]
        warp_inputs = [i for i in inputs if i.dataset_type.name == "directWarp"]
        assert warp_inputs
        assert all(
            (i.data_id["tract"], i.data_id["patch"])
            == (coadds[0].dataId["tract"], coadds[0].dataId["patch"])
            for i in warp_inputs
        )
        tracts = {ref.dataId["tract"] for ref in coadds}
        object_tables = butler.query_datasets("objectTable_tract", **kw)
        assert {ref.dataId["tract"] for ref in object_tables} == tracts
        # Forced photometry ran on every PVI, once per tract it overlaps (as in the DRP).
        forced = butler.query_datasets("forced_src", **kw)
        pvi_ids = {(r.dataId["visit"], r.dataId["detector"]) for r in pvis}
        assert {(r.dataId["visit"], r.dataId["detector"]) for r in forced} == pvi_ids
