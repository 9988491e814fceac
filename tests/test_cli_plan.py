"""`drp-campaign plan` end to end on the shipped dc2-test-med-1 spec, and the Dask planner against
the in-memory reference."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from drp_campaign.cli import app
from drp_campaign.model.focalplane import focal_plane
from drp_campaign.model.plan import plan_visits
from drp_campaign.model.sky import RingsSkyMap, sky_map_for
from drp_campaign.model.spec import load_spec, parse_spec
from drp_campaign.model.survey import make_survey
from drp_campaign.planner import PLAN_FILES, run_plan

ROOT = Path(__file__).resolve().parent.parent
DC2 = ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml"


@pytest.fixture(scope="module")
def dc2_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan")
    result = CliRunner().invoke(app, ["plan", str(DC2), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_plan_writes_exactly_the_documented_files(dc2_plan: Path) -> None:
    assert sorted(p.name for p in dc2_plan.iterdir()) == sorted(PLAN_FILES)
    readme = (ROOT / "README.md").read_text()
    for name in PLAN_FILES:
        assert f"`{name}`" in readme, f"{name} is not documented in the README"


def test_plan_summary_and_tables_agree(dc2_plan: Path) -> None:
    s = json.loads((dc2_plan / "summary.json").read_text())
    assert s["campaign"] == "dc2-test-med-1"
    assert s["skymap"] == {"name": "DC2_cells_v1", "rings": 120, "builder": "cells"}
    assert list(s["sites"]) == ["USDF", "FrDF", "UKDF"] and s["hub"] == "USDF"
    visits = pq.read_table(dc2_plan / "visits.parquet").to_pandas()
    patches = pq.read_table(dc2_plan / "patches.parquet").to_pandas()
    dets = pq.read_table(dc2_plan / "detectors.parquet").to_pandas()
    overlaps = pq.read_table(dc2_plan / "overlaps.parquet").to_pandas()
    transfers = pq.read_table(dc2_plan / "transfers.parquet").to_pandas()
    assert list(visits.columns) == ["visit", "band", "ra", "dec", "rotation", "site"]
    assert list(patches.columns) == ["tract", "patch", "site"]
    assert list(dets.columns) == ["visit", "detector", "site", "region"]
    assert list(overlaps.columns) == ["visit", "detector", "tract", "patch"]
    assert list(transfers.columns) == ["visit", "detector", "src_site", "dst_site", "bytes"]
    assert s["counts"]["visits"] == len(visits) == visits["visit"].nunique() == 300
    assert len(dets) == 300 * 189 == s["counts"]["visit_detectors"]
    assert len(overlaps) == s["counts"]["overlaps"]
    assert len(transfers) == s["counts"]["transfers"]
    # The DC2 test-med-1 tracts are in the plan.
    assert {3828, 3829} <= set(patches["tract"])
    # Bytes: the summary is the sum of the transfer rows, and never below the lower bound.
    b = s["bytes"]
    assert b["planned"] == int(transfers["bytes"].sum()) == sum(b["links"].values())
    assert b["lower_bound"] <= b["planned"] <= b["naive_round_robin"]
    # Each detector's region has four vertices near its visit's boresight.
    first = dets.iloc[0]
    v = visits.set_index("visit").loc[first["visit"]]
    verts = np.array([list(x) for x in first["region"]])
    assert verts.shape == (4, 2)
    assert np.all(np.abs(verts[:, 1] - v["dec"]) < 2.1)
    # A visit's detectors all live at the visit's home.
    merged = dets.merge(visits[["visit", "site"]], on="visit", suffixes=("", "_visit"))
    assert (merged["site"] == merged["site_visit"]).all()


def _digest(d: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((d / name).read_bytes()).hexdigest()
        for name in PLAN_FILES
        if name.endswith((".parquet", ".json"))
    }


def test_dask_planner_equals_in_memory_reference_and_is_deterministic(tmp_path: Path) -> None:
    spec = load_spec(DC2)
    visits = make_survey("dc2-test-med-1", seed=1, visits=40)
    a = run_plan(spec, tmp_path / "a", visits=visits, chunk_visits=7, plots=False)
    # Another chunking, other worker processes, shuffled input: the same bytes on disk.
    b = run_plan(
        spec,
        tmp_path / "b",
        visits=visits.sample(frac=1.0, random_state=4),
        workers=2,
        chunk_visits=11,
        plots=False,
    )
    assert _digest(a.out_dir) == _digest(b.out_dir)
    ref = plan_visits(sky_map_for(spec.skymap), focal_plane(spec.instrument), visits, spec.shares)
    got = pq.read_table(a.out_dir / "visits.parquet").to_pandas()
    sites = np.asarray(spec.site_names)
    assert list(got["site"]) == list(sites[ref.assignment.home])
    # Files list rows in sky order (by chunk); compare as sorted tables.
    xfer = pq.read_table(a.out_dir / "transfers.parquet").to_pandas()
    xfer = xfer.sort_values(["visit", "detector", "dst_site"]).reset_index(drop=True)
    want = (
        ref.transfers.assign(
            src_site=sites[ref.transfers["src_site"].to_numpy()],
            dst_site=sites[ref.transfers["dst_site"].to_numpy()],
        )
        .sort_values(["visit", "detector", "dst_site"])
        .reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(
        xfer[["visit", "detector", "src_site", "dst_site"]], want, check_dtype=False
    )
    ov = pq.read_table(a.out_dir / "overlaps.parquet").to_pandas()
    assert len(ov) == len(ref.overlaps)


def test_dask_planner_uses_the_whole_skymap_config(tmp_path: Path) -> None:
    # Worker processes rebuild the sky from the spec: a non-default pixel scale and builder must
    # reach them (the legacy HSC geometry has 9x9 patches of 4000 px at 0.168").
    text = DC2.read_text().replace(
        "builder: cells}", "builder: legacy, pixel_scale: 0.168, ra_start: 10}"
    )
    spec = parse_spec(text, DC2)
    assert spec.skymap.pixel_scale == 0.168
    visits = make_survey("dc2-test-med-1", seed=1, visits=12)
    result = run_plan(spec, tmp_path / "p", visits=visits, workers=2, chunk_visits=5, plots=False)
    assert result.summary["skymap"] == {
        "name": "DC2_cells_v1",
        "rings": 120,
        "builder": "legacy",
        "pixel_scale": 0.168,
        "ra_start": 10.0,
    }
    sky = sky_map_for(spec.skymap)
    assert sky.hash() != RingsSkyMap(120, "legacy").hash()
    ref = plan_visits(sky, focal_plane(spec.instrument), visits, spec.shares)
    ov = pq.read_table(result.out_dir / "overlaps.parquet").to_pandas()
    o = ref.overlaps
    want = set(
        zip(o.visit.tolist(), o.detector.tolist(), o.tract.tolist(), o.patch.tolist(), strict=True)
    )
    assert set(ov.itertuples(index=False, name=None)) == want and len(ov) == len(o)
    assert int(ov["patch"].max()) < 81


def test_bad_spec_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DC2.read_text().replace("hub: USDF", "hub: USFD"))
    exe = Path(sys.executable).parent / "drp-campaign"
    proc = subprocess.run(
        [str(exe), "plan", str(bad), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{bad}: hub: " in proc.stderr
    assert "did you mean 'USDF'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_plan_on_an_existing_dask_cluster(tmp_path: Path) -> None:
    from distributed import LocalCluster

    spec = load_spec(DC2)
    visits = make_survey("dc2-test-med-1", seed=1, visits=12)
    local = run_plan(spec, tmp_path / "local", visits=visits, plots=False)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=None,
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        remote = run_plan(
            spec,
            tmp_path / "remote",
            visits=visits,
            dask_address=cluster.scheduler_address,
            plots=False,
        )
    assert _digest(local.out_dir) == _digest(remote.out_dir)
