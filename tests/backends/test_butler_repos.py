"""Site repositories: real Butler repos whose regions are exactly the planner's polygons."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import lsst.pipe.base.tests.mocks  # noqa: F401  (mock storage classes in this process)
import numpy as np
import pytest
from lsst.daf.butler import Butler, CollectionType
from lsst.pipe.base.tests.mocks import MockDataset

from drp_campaign.backends.butler import (
    collections_for,
    create_repo,
    ingest_mock_calibs,
    ingest_mock_raws,
    ingest_mock_skymap,
    open_repo,
    populate_site_repos,
    register_campaign_dimensions,
)
from drp_campaign.backends.instrument import PHYSICAL_FILTERS, instrument_class
from drp_campaign.model.focalplane import focal_plane
from drp_campaign.model.plan import MemoryPlan, plan_visits
from drp_campaign.model.sky import sky_map_for
from drp_campaign.model.spec import CampaignSpec, load_spec
from drp_campaign.model.survey import survey_from_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
FILE_SIZE = 1500
INSTRUMENT = "LSSTComCam"
SKYMAP = "DC2_cells_v1"

SPEC_YAML = f"""\
campaign: dc2-test-small
instrument: {INSTRUMENT}
skymap: {{name: {SKYMAP}, rings: 120, builder: cells}}
survey: {{preset: dc2-test-med-1, seed: 1, visits: 6}}
hub: USDF
sites:
  USDF: {{compute_site: SLAC, cloud: US, share: 0.35}}
  FrDF: {{compute_site: CC-IN2P3, cloud: EU, share: 0.40}}
  UKDF: {{compute_site: LANCS, cloud: EU, share: 0.25}}
partition: {{policy: dec-bands}}
pipeline: {{yaml: {REPO_ROOT / "pipelines" / "DRP-mock.yaml"}}}
steps:
  - {{name: step1, subset: step1, shard: visit, placement: per-site}}
  - {{name: step2, subset: step2, shard: visit, placement: per-site}}
  - {{name: step2c, subset: step2c, shard: none, placement: gather}}
  - {{name: step3, subset: step3, shard: tract, placement: per-site}}
  - {{name: step4, subset: step4, shard: visit, placement: per-site}}
"""


def small_campaign(tmp: Path) -> tuple[CampaignSpec, MemoryPlan]:
    """The dc2-test-med-1 preset cut to 6 visits with the 9-detector LSSTComCam focal plane."""
    path = tmp / "spec.yaml"
    path.write_text(SPEC_YAML)
    spec = load_spec(path)
    sky = sky_map_for(spec.skymap)
    plan = plan_visits(sky, focal_plane(spec.instrument), survey_from_spec(spec), spec.shares)
    return spec, plan


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> tuple[CampaignSpec, MemoryPlan, Path]:
    tmp = tmp_path_factory.mktemp("repos")
    spec, plan = small_campaign(tmp)
    populate_site_repos(tmp, spec, plan, file_size=FILE_SIZE)
    return spec, plan, tmp


@pytest.fixture(scope="module")
def hub(campaign: tuple[CampaignSpec, MemoryPlan, Path]) -> Iterator[Butler]:
    _, _, tmp = campaign
    with open_repo(tmp / "repos" / "USDF", writeable=False) as butler:
        yield butler


def test_one_repo_per_site_raws_only_at_the_hub(
    campaign: tuple[CampaignSpec, MemoryPlan, Path],
) -> None:
    spec, plan, tmp = campaign
    names = collections_for(INSTRUMENT)
    n_det = len(focal_plane(INSTRUMENT).detectors)
    for site in spec.site_names:
        with open_repo(tmp / "repos" / site, writeable=False) as butler:
            raws = butler.query_datasets(
                "raw", collections=names.defaults, instrument=INSTRUMENT, explain=False, limit=None
            )
            assert len(raws) == (len(plan.visits) * n_det if site == spec.hub else 0)
            # Calibrations and the skymap everywhere, through the defaults chain.
            bias = butler.query_datasets("bias", collections=names.calib, instrument=INSTRUMENT)
            flat = butler.query_datasets("flat", collections=names.calib, instrument=INSTRUMENT)
            assert len(bias) == n_det and len(flat) == 6 * n_det
            assert butler.collections.get_info(names.calib).type is CollectionType.CALIBRATION
            assert butler.collections.get_info(names.defaults).children == (
                names.raw_run,
                names.calib_chain,
                "skymaps",
            )
            assert len(butler.query_datasets("skyMap", collections="skymaps", skymap=SKYMAP)) == 1
            # Every site knows every visit (graph building needs the records).
            visits = butler.query_dimension_records("visit", instrument=INSTRUMENT, limit=None)
            assert sorted(r.id for r in visits) == sorted(plan.visits["visit"].tolist())


def test_mock_raw_is_a_real_file_of_the_requested_size(hub: Butler) -> None:
    ref = hub.query_datasets("raw", collections=f"{INSTRUMENT}/raw/all", instrument=INSTRUMENT)[0]
    uri = hub.getURI(ref)
    assert Path(uri.ospath).stat().st_size == FILE_SIZE
    raw = hub.get(ref)
    assert isinstance(raw, MockDataset)
    assert raw.dataset_id == ref.id and raw.data_id["detector"] == ref.dataId["detector"]


def test_rerun_is_a_no_op(campaign: tuple[CampaignSpec, MemoryPlan, Path]) -> None:
    spec, plan, tmp = campaign
    again = populate_site_repos(tmp, spec, plan, file_size=FILE_SIZE)
    assert all(repo.n_raws == 0 for repo in again.values())


def test_instrument_records_come_from_the_focal_plane(hub: Butler) -> None:
    plane = focal_plane(INSTRUMENT)
    records = {r.id: r for r in hub.query_dimension_records("detector", instrument=INSTRUMENT)}
    assert sorted(records) == [d.id for d in plane.detectors]
    for det in plane.detectors:
        rec = records[det.id]
        assert (rec.full_name, rec.raft, rec.name_in_raft, rec.purpose) == (
            det.name,
            det.raft,
            det.sensor,
            "SCIENCE",
        )
    filters = {r.name: r.band for r in hub.query_dimension_records("physical_filter")}
    assert filters == {pf: band for band, pf in PHYSICAL_FILTERS[INSTRUMENT].items()}
    (inst,) = hub.query_dimension_records("instrument")
    assert inst.class_name == "drp_campaign.backends.instrument.MockLSSTComCam"


def _vertices(region: object) -> np.ndarray:
    return np.array([[v.x(), v.y(), v.z()] for v in region.getVertices()])  # type: ignore[attr-defined]


def test_visit_detector_regions_are_the_planner_polygons(
    campaign: tuple[CampaignSpec, MemoryPlan, Path], hub: Butler
) -> None:
    _, plan, _ = campaign
    plane = focal_plane(INSTRUMENT)
    records = {
        (r.visit, r.detector): r.region
        for r in hub.query_dimension_records(
            "visit_detector_region", instrument=INSTRUMENT, limit=None
        )
    }
    assert len(records) == len(plan.visits) * plane.n_detectors
    for row in plan.visits.itertuples():
        polygons = plane.detector_polygons(row.ra, row.dec, row.rotation)
        for det, poly in zip(plane.detectors, polygons, strict=True):
            # Bit-for-bit: the registry stores the encoded polygon.
            assert np.array_equal(_vertices(records[(row.visit, det.id)]), _vertices(poly))
        (visit,) = hub.query_dimension_records("visit", instrument=INSTRUMENT, visit=row.visit)
        assert all(visit.region.contains(p.getCentroid()) for p in polygons)


def test_tract_and_patch_regions_are_the_planner_polygons(
    campaign: tuple[CampaignSpec, MemoryPlan, Path], hub: Butler
) -> None:
    spec, plan, _ = campaign
    sky = sky_map_for(spec.skymap)
    (skymap,) = hub.query_dimension_records("skymap")
    assert skymap.hash == sky.hash() and skymap.tract_max == len(sky) == 18938
    assert (skymap.patch_nx_max, skymap.patch_ny_max) == (10, 10)
    tracts = sorted(set(plan.overlaps.tract.tolist()))
    tract_records = {r.id: r for r in hub.query_dimension_records("tract", skymap=SKYMAP)}
    assert sorted(tract_records) == tracts
    patches = {
        (r.tract, r.id): r for r in hub.query_dimension_records("patch", skymap=SKYMAP, limit=None)
    }
    assert len(patches) == 100 * len(tracts)
    for tract_id in tracts:
        tract = sky[tract_id]
        assert np.array_equal(
            _vertices(tract_records[tract_id].region), _vertices(tract.outer_polygon())
        )
        for seq in range(100):
            rec = patches[(tract_id, seq)]
            assert (rec.cell_x, rec.cell_y) == tract.patch_index(seq)
            assert np.array_equal(_vertices(rec.region), _vertices(tract.patch_outer_polygon(seq)))


def test_spatial_join_returns_the_planner_overlaps(
    campaign: tuple[CampaignSpec, MemoryPlan, Path], hub: Butler
) -> None:
    _, plan, _ = campaign
    o = plan.overlaps
    planner = set(
        zip(o.visit.tolist(), o.detector.tolist(), o.tract.tolist(), o.patch.tolist(), strict=True)
    )
    rows = hub.query_data_ids(
        ["visit", "detector", "tract", "patch"], instrument=INSTRUMENT, skymap=SKYMAP, limit=None
    )
    butler = {(d["visit"], d["detector"], d["tract"], d["patch"]) for d in rows}
    assert butler == planner
    # At tract level the Butler joins detector regions with the tract's OUTER polygon, while the
    # cells builder's patch outer boxes stick out of it by their border: a detector can overlap a
    # patch of a tract without overlapping the tract polygon. Graphs of tasks with patch inputs
    # (forcedPhotCcd) still follow the patch overlaps.
    rows = hub.query_data_ids(
        ["visit", "detector", "tract"], instrument=INSTRUMENT, skymap=SKYMAP, limit=None
    )
    butler_tract = {(d["visit"], d["detector"], d["tract"]) for d in rows}
    assert butler_tract <= {key[:3] for key in planner}


def test_register_instrument_command_path(tmp_path: Path) -> None:
    # What `butler register-instrument REPO drp_campaign.backends.instrument.MockLSSTCam` runs.
    from lsst.pipe.base.script import register_instrument

    create_repo(tmp_path / "repo").close()
    register_instrument(str(tmp_path / "repo"), ["drp_campaign.backends.instrument.MockLSSTCam"])
    register_instrument(str(tmp_path / "repo"), ["drp_campaign.backends.instrument.MockLSSTCam"])
    with open_repo(tmp_path / "repo", writeable=False) as butler:
        assert len(butler.query_dimension_records("detector", instrument="LSSTCam")) == 189
    assert instrument_class("LSSTCam-imSim")().getName() == "LSSTCam-imSim"


@pytest.mark.postgres
def test_postgresql_registry(tmp_path: Path) -> None:
    url = os.environ.get("DRP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DRP_TEST_POSTGRES_URL is not set (a postgresql:// URL of a test server)")
    spec, plan = small_campaign(tmp_path)
    namespace = f"drp_test_{uuid.uuid4().hex[:12]}"
    with create_repo(tmp_path / "pg", registry_db=url, namespace=namespace) as butler:
        assert "postgresql" in str(butler._config["registry", "db"])  # type: ignore[attr-defined]
        register_campaign_dimensions(
            butler, spec, plan.visits, SKYMAP, sorted(set(plan.overlaps.tract.tolist()))
        )
        ingest_mock_calibs(butler, INSTRUMENT, size_bytes=FILE_SIZE)
        ingest_mock_skymap(butler, SKYMAP, size_bytes=FILE_SIZE)
        refs = ingest_mock_raws(
            butler, plan.visits["visit"].tolist(), size_bytes=FILE_SIZE, instrument=INSTRUMENT
        )
        assert len(refs) == len(plan.visits) * 9
        o = plan.overlaps
        rows = butler.query_data_ids(
            ["visit", "detector", "tract", "patch"],
            instrument=INSTRUMENT,
            skymap=SKYMAP,
            limit=None,
        )
        assert {(d["visit"], d["detector"], d["tract"], d["patch"]) for d in rows} == set(
            zip(
                o.visit.tolist(),
                o.detector.tolist(),
                o.tract.tolist(),
                o.patch.tolist(),
                strict=True,
            )
        )


# --- a RUN collection survives a kill during its registration ----------------------------------

_KILL_BETWEEN_INSERTS = """
import os, sys
from lsst.daf.butler import Butler
from drp_campaign.backends.butler import register_run

butler = Butler.from_config(sys.argv[1], writeable=True)
db = butler._registry._db
sync = db.sync

def killed_before_the_run_row(table, *args, **kwargs):
    if table.name == "run":
        os._exit(9)  # as a SIGKILL would, with no cleanup
    return sync(table, *args, **kwargs)

db.sync = killed_before_the_run_row
register_run(butler, "campaign/step2/FrDF/run")
"""


def test_register_run_is_atomic_under_a_kill(tmp_path: Path) -> None:
    """A process killed between daf_butler's two inserts leaves no half-made RUN behind.

    Without the enclosing transaction the collection row stays without its run row, and every
    later dataset insert into it fails on the foreign key, which made a site-step killed during
    its final job impossible to resume.
    """
    import subprocess
    import sys

    from lsst.daf.butler import Butler, DatasetType

    from drp_campaign.backends.butler import has_collection, register_run

    repo = tmp_path / "repo"
    Butler.makeRepo(str(repo))
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_BETWEEN_INSERTS, str(repo)], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    run = "campaign/step2/FrDF/run"
    with Butler.from_config(str(repo), writeable=True) as butler:
        assert not has_collection(butler, run)
        # The resumed job registers it whole and can store into it.
        assert register_run(butler, run) is True
        assert register_run(butler, run) is False
        dataset_type = DatasetType("summary", (), "StructuredDataDict", universe=butler.dimensions)
        butler.registry.registerDatasetType(dataset_type)
        ref = butler.put({"visits": 2}, dataset_type, run=run)
        assert butler.get(ref) == {"visits": 2}


_KILL_BEFORE_THE_INPUTS = """
import os, sys
from lsst.daf.butler import Butler
from drp_campaign.backends.butler import ensure_output_chain

butler = Butler.from_config(sys.argv[1], writeable=True)

def killed_before_the_inputs(self, *args, **kwargs):
    os._exit(9)  # as a SIGKILL would, with no cleanup

type(butler.collections).extend_chain = killed_before_the_inputs
ensure_output_chain(butler, "campaign/FrDF/output", ["inputs"])
"""


def test_output_chain_is_created_whole_or_not_at_all(tmp_path: Path) -> None:
    """A kill between registering the output chain and adding the inputs leaves no chain.

    The final job creates the chain in separate transactions; a chain left without its inputs
    was never repaired, and every later step at the site missed the raws, calibrations and
    sky map.
    """
    import subprocess
    import sys

    from drp_campaign.backends.butler import ensure_output_chain, has_collection, register_run

    repo = tmp_path / "repo"
    Butler.makeRepo(str(repo))
    with Butler.from_config(str(repo), writeable=True) as butler:
        for run in ("raws", "calibs"):
            register_run(butler, run)
        butler.collections.register("inputs", CollectionType.CHAINED)
        butler.collections.redefine_chain("inputs", ["raws", "calibs"])
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_BEFORE_THE_INPUTS, str(repo)], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    chain = "campaign/FrDF/output"
    with Butler.from_config(str(repo), writeable=True) as butler:
        assert not has_collection(butler, chain)
        assert ensure_output_chain(butler, chain, ["inputs"]) is True
        assert list(butler.collections.get_info(chain).children) == ["raws", "calibs"]
        # The final job then prepends its run; a second preparation changes nothing.
        register_run(butler, "campaign/step1/FrDF/run")
        butler.collections.prepend_chain(chain, "campaign/step1/FrDF/run")
        assert ensure_output_chain(butler, chain, ["inputs"]) is False
        assert list(butler.collections.get_info(chain).children) == [
            "campaign/step1/FrDF/run",
            "raws",
            "calibs",
        ]
