"""`drp-campaign plan` on a survey read from a Butler registry (``survey: {butler, where}``).

The registry's instrument is one the project has no focal-plane model of ("HSC" here: six
detectors whose regions are 5- and 6-sided polygons), registered through daf_butler dimension
records only; the plan must take its detector regions exactly as stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from lsst.daf.butler import Butler
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d
from typer.testing import CliRunner

from drp_campaign.backends import registry_survey
from drp_campaign.backends.registry_survey import (
    iter_detector_regions,
    register_instrument_records,
    register_visit_regions,
)
from drp_campaign.cli import app
from drp_campaign.model.overlaps import brute_force_polygon_overlaps
from drp_campaign.model.sky import RingsSkyMap

ROOT = Path(__file__).resolve().parent.parent
DC2 = ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml"
PRESET = "{preset: dc2-test-med-1, seed: 1}"
FILTERS = {"HSC-G": "g", "HSC-R2": "r", "HSC-I2": "i", "NB0921": "N921"}
N_VISITS = 24


def _polygon(ra: float, dec: float, radius: float, n: int, phase: float) -> ConvexPolygon:
    angles = phase + np.arange(n) * 2.0 * np.pi / n
    return ConvexPolygon(
        [
            UnitVector3d(
                LonLat.fromDegrees(
                    ra + radius * np.cos(a) / np.cos(np.radians(dec)), dec + radius * np.sin(a)
                )
            )
            for a in angles
        ]
    )


def _fake_hsc_visits(rng: np.random.Generator) -> list[tuple[int, str, list[tuple[int, Any]]]]:
    visits = []
    names = list(FILTERS)
    for i in range(N_VISITS):
        ra0 = 57.56 + rng.uniform(-1.0, 1.0)
        dec0 = -36.45 + rng.uniform(-0.8, 0.8)
        regions = [
            (
                det,
                _polygon(ra0 + 0.3 * (det % 3 - 1), dec0 + 0.3 * (det // 3), 0.17, 5 + det % 2, i),
            )
            for det in range(6)
        ]
        visits.append((1000 + 2 * i, names[i % len(names)], regions))
    return visits


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub") / "repo"
    Butler.makeRepo(str(root))
    with Butler.from_config(str(root), writeable=True) as butler:
        register_instrument_records(butler, "HSC", FILTERS, range(6))
        register_visit_regions(butler, "HSC", _fake_hsc_visits(np.random.default_rng(5)))
    return root


def _spec(directory: Path, survey: str, instrument: str = "HSC") -> Path:
    text = DC2.read_text().replace(PRESET, survey)
    text = text.replace("instrument: LSSTCam-imSim", f"instrument: {instrument}")
    text = text.replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    path = directory / "spec.yaml"
    path.write_text(text)
    return path


def _plan(spec: Path, out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["plan", str(spec), "--out", str(out), *args])
    return result.exit_code, result.output


def _stored(root: Path, instrument: str) -> dict[tuple[int, int], np.ndarray]:
    """Every stored visit_detector_region as [ra, dec] vertices, in the stored order."""
    with Butler.from_config(str(root), writeable=False) as butler:
        records = butler.query_dimension_records(
            "visit_detector_region", instrument=instrument, limit=None
        )
    out = {}
    for rec in records:
        vertices = [LonLat(v) for v in rec.region.getVertices()]
        out[(int(rec.visit), int(rec.detector))] = np.array(
            [[v.getLon().asDegrees(), v.getLat().asDegrees()] for v in vertices]
        )
    return out


@pytest.fixture(scope="module")
def hsc_plan(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("spec")
    # The repository is named relative to the spec, as an operator would.
    rel = Path("..") / registry.parent.name / registry.name
    spec = _spec(directory, f"{{butler: {rel}}}")
    out = directory / "plan"
    code, output = _plan(spec, out, "--chunk", "5")
    assert code == 0, output
    return out


def test_registry_plan_uses_the_stored_regions(registry: Path, hsc_plan: Path) -> None:
    dets = pq.read_table(hsc_plan / "detectors.parquet").to_pandas()
    stored = _stored(registry, "HSC")
    assert len(dets) == len(stored) == N_VISITS * 6
    for row in dets.itertuples(index=False):
        got = np.array([list(v) for v in row.region])
        want = stored[(row.visit, row.detector)]
        assert got.shape == want.shape and got.shape[0] in (5, 6)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    summary = json.loads((hsc_plan / "summary.json").read_text())
    assert summary["instrument"] == "HSC"
    assert summary["counts"]["visits"] == N_VISITS
    assert summary["counts"]["visit_detectors"] == N_VISITS * 6
    visits = pq.read_table(hsc_plan / "visits.parquet").to_pandas()
    assert set(visits["band"]) == set(FILTERS.values())
    assert (visits["rotation"] == 0.0).all()
    # Overlaps: exactly what sphgeom finds for the stored polygons.
    keys = sorted(stored)
    counts = [len(stored[k]) for k in keys]
    flat = np.concatenate([stored[k] for k in keys])
    ref = brute_force_polygon_overlaps(
        RingsSkyMap(120, "cells"),
        [k[0] for k in keys],
        [k[1] for k in keys],
        np.concatenate([[0], np.cumsum(counts)]),
        flat[:, 0],
        flat[:, 1],
    )
    ov = pq.read_table(hsc_plan / "overlaps.parquet").to_pandas()
    got_rows = sorted(ov.itertuples(index=False, name=None))
    want_rows = list(zip(ref.visit, ref.detector, ref.tract, ref.patch, strict=True))
    assert got_rows == [tuple(int(x) for x in r) for r in want_rows]
    assert summary["counts"]["overlaps"] == len(ref) > 0


def test_visit_position_is_the_centre_of_its_region_without_a_boresight(
    registry: Path, hsc_plan: Path
) -> None:
    visits = pq.read_table(hsc_plan / "visits.parquet").to_pandas().set_index("visit")
    with Butler.from_config(str(registry), writeable=False) as butler:
        for rec in butler.query_dimension_records("visit", instrument="HSC", limit=None):
            centre = LonLat(rec.region.getBoundingCircle().getCenter())
            got = visits.loc[int(rec.id)]
            assert got["ra"] == pytest.approx(centre.getLon().asDegrees(), abs=1e-12)
            assert got["dec"] == pytest.approx(centre.getLat().asDegrees(), abs=1e-12)


def test_pages_grow_to_the_region_target_and_read_every_region_once(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 6 detectors a visit: a first page of 2 visits (12 regions), then pages of 30 // 6 = 5
    # visits (30 regions) until the visits run out; an unknown visit id just has no regions.
    monkeypatch.setattr(registry_survey, "PAGE_REGIONS", 30)
    visits = [1000 + 2 * i for i in range(N_VISITS)] + [999_999]
    pages = list(iter_detector_regions(registry, "HSC", visits[::-1], page_visits=2))
    assert [len(p) for p in pages] == [12, 30, 30, 30, 30, 12]
    stored = _stored(registry, "HSC")
    got = {}
    for page in pages:
        keys = list(zip(page.visit.tolist(), page.detector.tolist(), strict=True))
        assert keys == sorted(keys)
        for i, key in enumerate(keys):
            lo, hi = page.offsets[i], page.offsets[i + 1]
            got[key] = np.column_stack([page.ra[lo:hi], page.dec[lo:hi]])
    assert sorted(got) == sorted(stored)
    for key, want in stored.items():
        np.testing.assert_allclose(got[key], want, rtol=0, atol=1e-10)


def test_where_selects_visits(registry: Path, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, f"{{butler: {registry}, where: \"band IN ('g', 'r') AND visit > 1005\"}}"
    )
    code, output = _plan(spec, tmp_path / "plan")
    assert code == 0, output
    visits = pq.read_table(tmp_path / "plan" / "visits.parquet").to_pandas()
    assert len(visits) > 0
    assert set(visits["band"]) <= {"g", "r"} and (visits["visit"] > 1005).all()
    dets = pq.read_table(tmp_path / "plan" / "detectors.parquet").to_pandas()
    assert set(dets["visit"]) == set(visits["visit"])


@pytest.mark.parametrize(
    ("survey", "instrument", "expected"),
    [
        (
            "{butler: no/such/repo}",
            "HSC",
            "survey.butler: 'no/such/repo' is not valid: cannot open the Butler repository",
        ),
        (
            "{butler: REPO, where: \"band = 'y'\"}",
            "HSC",
            "survey.where: \"band = 'y'\" is not valid: no visit of HSC in REPO matches "
            "\"band = 'y'\". Fix: widen or remove 'where'.",
        ),
        (
            "{butler: REPO, where: 'band = '}",
            "HSC",
            "survey.where: 'band = ' is not valid: the registry rejects the query",
        ),
        (
            "{butler: REPO}",
            "HSc",
            "instrument: 'HSc' is not valid: the instrument is not registered in REPO "
            "(registered: HSC). Fix: use 'HSC'.",
        ),
    ],
    ids=["bad-repo", "no-match", "bad-query", "unregistered-instrument"],
)
def test_unusable_registry_exits_2(
    registry: Path, tmp_path: Path, survey: str, instrument: str, expected: str
) -> None:
    spec = _spec(tmp_path, survey.replace("REPO", str(registry)), instrument)
    code, output = _plan(spec, tmp_path / "plan")
    assert code == 2, output
    flat = " ".join(output.split())
    assert f"{spec}: {expected.replace('REPO', str(registry))}" in flat
    assert "Traceback" not in output
    assert not (tmp_path / "plan").exists()


def test_registry_seeded_from_a_preset_plans_like_the_preset(tmp_path: Path) -> None:
    from drp_campaign.backends.butler import create_repo, register_campaign_dimensions
    from drp_campaign.model.spec import load_spec
    from drp_campaign.model.survey import make_survey

    spec = load_spec(DC2)
    visits = make_survey("dc2-test-med-1", seed=1, visits=20)
    with create_repo(tmp_path / "hub") as butler:
        register_campaign_dimensions(butler, spec, visits)
    preset = _spec(tmp_path, "{preset: dc2-test-med-1, seed: 1, visits: 20}", "LSSTCam-imSim")
    code, output = _plan(preset, tmp_path / "preset")
    assert code == 0, output
    from_registry = _spec(tmp_path, f"{{butler: {tmp_path / 'hub'}}}", "LSSTCam-imSim")
    code, output = _plan(from_registry, tmp_path / "registry")
    assert code == 0, output
    for name, key in (
        ("visits.parquet", ["visit"]),
        ("patches.parquet", ["tract", "patch"]),
        ("overlaps.parquet", ["visit", "detector", "tract", "patch"]),
        ("transfers.parquet", ["visit", "detector", "dst_site"]),
    ):
        a = pq.read_table(tmp_path / "preset" / name).to_pandas().sort_values(key)
        b = pq.read_table(tmp_path / "registry" / name).to_pandas().sort_values(key)
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    a = pq.read_table(tmp_path / "preset" / "detectors.parquet").to_pandas()
    b = pq.read_table(tmp_path / "registry" / "detectors.parquet").to_pandas()
    assert list(a["visit"]) == list(b["visit"]) and list(a["site"]) == list(b["site"])
    for ra, rb in zip(a["region"], b["region"], strict=True):
        va, vb = np.array([list(v) for v in ra]), np.array([list(v) for v in rb])
        # The same four corners (sphgeom may start the polygon at another corner).
        assert va.shape == vb.shape == (4, 2)
        assert sorted(map(tuple, np.round(va, 9))) == sorted(map(tuple, np.round(vb, 9)))
